//! `weft-injector`: the mutating admission webhook (TLS on 8443, path `/inject`).

fn main() {}
