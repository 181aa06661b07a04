//! One module per subcommand.

pub mod copy;
pub mod debug;
pub mod demo;
pub mod nbd;
pub mod point;
pub mod vault;
