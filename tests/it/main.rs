//! Integration tests: one binary, modules by subject.
mod archive;
mod commands;
mod engine;
mod explain;
mod faults;
mod layers;
mod model;
mod observe;
mod outages;
mod pgstore;
mod scaleout;
mod scaleout_jobs;
mod service;
mod settings;
mod windows;
