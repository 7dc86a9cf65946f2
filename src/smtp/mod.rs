//! SMTP on both sides of the proxy: the sans-IO wire format (`codec`, `address`), the
//! client-facing state machine (`session`), the client towards the upstream (`relay`) and
//! the upstream connections kept between sessions (`pool`).

pub mod address;
pub mod codec;
pub mod pool;
pub mod relay;
pub mod session;
