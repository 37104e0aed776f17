// The test bed's pause image: the process that holds a pod sandbox's namespaces. It sleeps,
// reaps the children it inherits as PID 1, and exits 0 on SIGTERM or SIGINT. Static
// (CGO_ENABLED=0), so the image needs no other file.
//
// Given file paths (an application container, e.g. `make demo`'s pod), it first prints each
// file as the process inside the pod reads it, so `kubectl logs` shows what the pod sees.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	for _, path := range os.Args[1:] {
		data, err := os.ReadFile(path)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n", path, err)
			continue
		}
		fmt.Printf("%s: %s\n", path, data)
	}
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range signals {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		reap()
	}
}

// reap collects every exited child so none stays a zombie.
func reap() {
	for {
		var status syscall.WaitStatus
		pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
		if pid <= 0 || err != nil {
			return
		}
	}
}
