//! What the backend test binaries share: the servers ([`testbeds`]) and the conformance suite
//! with its helpers ([`suite`]).

pub mod suite;
pub mod testbeds;
