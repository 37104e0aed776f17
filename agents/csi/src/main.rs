//! KubeBao: The Secrets Store CSI provider.
fn main() {}
