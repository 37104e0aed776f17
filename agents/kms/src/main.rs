//! KubeBao: The KMS v2 plugin.
fn main() {}
