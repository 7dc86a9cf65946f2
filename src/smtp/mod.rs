//! SMTP on both sides of the proxy: the sans-IO wire format (`codec`, `address`), the
//! client-facing state machine (`session`) and the client towards the upstream (`relay`).

pub mod address;
pub mod codec;
pub mod relay;
pub mod session;
