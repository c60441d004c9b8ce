//! Integration tests: one binary, modules by subject.
mod archive;
mod engine;
mod model;
mod scaleout;
mod service;
