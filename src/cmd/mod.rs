//! The commands besides `serve`, each in its own file: `adclick recalc` and `reconcile`
//! (`admin`), `ship`, `status`, `generate` and `demo`'s generator, and `bench`.

pub mod admin;
pub mod bench;
pub mod generate;
pub mod ship;
pub mod status;
