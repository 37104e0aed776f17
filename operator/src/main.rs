//! KubeBao: The operator.
fn main() {}
