//! batchd's integration tests, one binary (one link of the crate) with a module per area.
//!
//! Most modules start the real `batchd` binary (`common::Server`) against the project's mock
//! upstream, in process: crash, cluster and signal tests need the process boundary, and the
//! others use the same helpers so that every black-box test drives what users run.
//! `memory` counts heap bytes through this binary's global allocator, per thread.

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
