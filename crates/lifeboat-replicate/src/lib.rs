//! Replication between `lifeboat agent` (primary site) and `lifeboat
//! server` (recovery site).
//!
//! * [`tls`]: the server's CA, enrollment tokens, mutual TLS 1.3 configs;
//! * [`framed`]: frames of `lifeboat_format::proto` on async streams;
//! * [`receiver`]: the server's side of a stream as a state machine with no
//!   I/O of its own (applies records in order, answers hash compares);
//! * [`shipper`]: the agent's side: ships the journal, resyncs gaps by hash;
//! * [`throttle`]: bandwidth limits and the parsers of rates, sizes, durations.
//!
//! Guarantees: a write the server acknowledged is durable in its replica; a
//! stream never skips a record silently (gaps are closed by a resync pass
//! compared by hash, never by a full re-seed); a peer that sends garbage,
//! another protocol version or a truncated frame is disconnected with the
//! reason and changes nothing.

pub mod agent;
pub mod framed;
pub mod receiver;
pub mod shipper;
pub mod throttle;
pub mod tls;
