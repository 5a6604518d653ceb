//! Sources: systems of record captured into Syncline topics. One so far: PostgreSQL.

pub mod postgres;
