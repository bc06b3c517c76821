//! The proxy injector: decides whether a pod joins the mesh and computes the patch that
//! adds the init step and the proxy. Shared by the admission webhook and `weft inject`.
