//! batchd's integration tests, one binary (one link of the crate) with a module per area.
//!
//! The modules of a node drive it over HTTP against the project's mock upstream (which runs
//! in this process). Where no process boundary is under test — the API, the engine, events,
//! hardening of the HTTP edge, Message Batches, the console — the node is the app `batchd
//! serve` runs, started in this process (`common::spawn_app`, module `app`); crash, cluster,
//! signal, CLI, upgrade, fault and limits tests, and those that read the server process's
//! memory or sockets, start the real `batchd` binary (`common::Server::start`). `store` runs
//! the store's conformance suite on SQLite and PostgreSQL.
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
