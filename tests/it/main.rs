//! Integration tests: one binary, modules by subject.
mod archive;
mod engine;
mod model;
mod pgstore;
mod scaleout;
mod service;
