//! Sources: systems of record captured into Syncline topics. One so far: PostgreSQL
//! (`postgres`, with its checks and setup in `catalog`).

mod catalog;
pub mod postgres;
