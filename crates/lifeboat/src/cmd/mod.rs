//! One module per subcommand.

pub mod copy;
pub mod debug;
pub mod demo;
pub mod point;
pub mod vault;
