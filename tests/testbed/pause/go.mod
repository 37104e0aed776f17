module kubebao.local/testbed/pause

go 1.25
