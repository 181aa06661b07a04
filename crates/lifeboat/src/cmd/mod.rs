//! One module per subcommand.

pub mod agent;
pub mod copy;
pub mod debug;
pub mod demo;
pub mod demo_sites;
pub mod nbd;
pub mod point;
pub mod server;
pub mod status;
pub mod vault;
