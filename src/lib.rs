//! thassp: an anti-spam SMTP proxy. It listens where the world delivers mail, refuses spam
//! with cheap, robust checks, and relays the rest, in the same session, to the real MTA.
//!
//! # Layout
//!
//! - [`config`]: the TOML configuration, its defaults and validation (plain data).
//! - [`app`]: configuration turned into run-time state (`Snapshot`), reload, shutdown phase.
//! - [`proxy_protocol`]: sans-IO PROXY protocol v1/v2 header parser (real client behind a balancer).
//! - [`server`]: listeners, accept loop, connection cap, one task per connection, drain.
//! - [`smtp::codec`]: sans-IO wire format: commands, replies, DATA framing, dot-stuffing.
//! - [`smtp::address`]: envelope address parsing that keeps every relay trick visible.
//! - [`smtp::session`]: the client-side state machine; asks the policy at each stage.
//! - [`smtp::relay`]: the client towards the upstream MTA (pipelined when it offers it).
//! - [`upstream`]: upstream MTAs, their probed capabilities, and domain routing.
//! - [`dns`]: the one resolver (config, lookups, reverse DNS with forward confirmation).
//! - [`policy`]: stages, verdicts, the `Check` trait and the pipeline; one file per check.
//! - [`limits`]: per-client connection accounting (concurrency, rate), sharded.
//! - [`live`]: the registry of sessions in progress (admin status, console).
//! - [`store`]: the state store (memory, SQLite, Redis) for greylisting, reputation, blocks.
//! - [`events`]: event log to SQL (bounded queue, batching writer, retention) and the statistics.
//! - [`service`]: the one admin API (status, statistics, events, lists, greylist, blocks,
//!   configuration, reload) that every admin front end calls.
//! - [`admin`]: the admin front ends (web UI and JSON API, line console) and their auth.
//! - [`metrics`]: every metric, exported in the OpenMetrics text format.
//! - [`devsink`]: a development upstream that stores mail as files (trying out, tests).
//! - [`tls`]: rustls server configs per listener and client configs per upstream.
//! - [`stream`]: the byte streams sessions run over (STARTTLS upgrade, PROXY leftovers).
//!
//! # Promises
//!
//! No mail is lost (250 only after the upstream's 250); never an open relay; no smuggling
//! (only `<CRLF>.<CRLF>` ends DATA); hostile input costs bounded work; mail flow never waits
//! on bookkeeping.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod devsink;
pub mod dns;
pub mod events;
pub mod limits;
pub mod live;
pub mod metrics;
pub mod policy;
pub mod proxy_protocol;
pub mod server;
pub mod service;
pub mod smtp;
pub mod store;
pub mod stream;
pub mod tls;
pub mod upstream;
