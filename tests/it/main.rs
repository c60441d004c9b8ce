//! Integration tests: one binary, modules by subject.
mod engine;
mod model;
mod service;
