//! sandgate's integration tests: one binary, real sockets on 127.0.0.1, real processes (the
//! `sandgate-fixture` upstream as each sandbox's dev server).

#[macro_use]
mod common;

mod access;
mod api;
mod audit;
mod auth;
mod cli;
mod docker;
#[macro_use]
mod exec;
mod egress;
mod fastlane;
mod files;
mod framing;
mod frontdoor;
mod health;
mod idle;
mod image;
mod isolation;
mod kubernetes;
mod layers;
mod lifecycle;
mod limits;
mod metrics;
mod policy;
mod postgres;
mod prefix;
mod preview;
mod proxy;
mod pty;
mod replicas;
mod resilience;
mod restart;
mod streaming;
mod tls;
mod tokens;
mod warm;
mod websocket;
