//! Integration tests: one binary, modules by subject.
mod archive;
mod engine;
mod model;
mod observe;
mod pgstore;
mod scaleout;
mod service;
