//! batchd's integration tests, one binary (one link of the crate) with a module per area.
//!
//! Every module drives a batchd node over HTTP against the project's mock upstream (which
//! runs in this process). Where no process boundary is under test — the API, the engine,
//! events, hardening of the HTTP edge, limits, Message Batches — the node is the app
//! `batchd serve` runs, started in this process (`common::spawn_app`, module `app`); crash,
//! cluster, signal, CLI, upgrade and memory-of-the-process tests start the real `batchd`
//! binary (`common::Server::start`).
//! `memory` counts heap bytes through this binary's global allocator, per thread.

mod app;
mod common;

mod anthropic;
mod api;
mod cli;
mod cluster;
mod console;
mod crash;
mod engine;
mod events;
mod faults;
mod hardening;
mod limits;
mod memory;
mod msgbatch;
mod prefix;
mod props;
mod remote;
mod store;
mod translate;
mod upgrade;
