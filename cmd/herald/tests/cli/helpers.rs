//! The CLI tests run the `herald` binary cargo built for them, through the one process stack.

use std::collections::HashMap;
use std::process::Command;

pub use herald_core::testing::stack::{free_port, repo_root};

/// One test's database, prefix and ports, as environment variables for every process.
pub type Stack = herald_core::testing::ProcessStack;

/// A stack over the binary under test.
pub async fn stack(extra: &[(&str, &str)]) -> Stack {
    let extra: Vec<(&str, String)> = extra.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    Stack::new(env!("CARGO_BIN_EXE_herald"), &extra).await
}

/// `herald` with the test environment and nothing inherited from the caller's `HERALD__*`.
pub fn herald(vars: &HashMap<String, String>) -> Command {
    herald_core::testing::stack::herald_command(env!("CARGO_BIN_EXE_herald").as_ref(), vars, &[])
}
