//! The client commands as the binary parses them: flattened beside the
//! runner commands, their flags still global, the runner's still theirs.
//! (The client commands' own parse tests are in `isocloud-client`.)

use clap::{CommandFactory as _, Parser as _};

use crate::client::ClientCommand;
use crate::settings::{Cli, Command};

#[test]
fn the_command_tree_is_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn client_commands_reach_the_client_crate() {
    let cli = Cli::try_parse_from(["isocloud", "projects", "list", "--url", "http://x:1", "--token", "t"]).unwrap();
    let Command::Client(ClientCommand::Projects { connection, .. }) = cli.command else {
        panic!("not the projects command: {:?}", cli.command)
    };
    assert_eq!(connection.url.as_deref(), Some("http://x:1"));
    assert_eq!(connection.token.as_deref(), Some("t"));
}

#[test]
fn runner_commands_still_parse() {
    let cli = Cli::try_parse_from(["isocloud", "serve", "--apps", "x"]).unwrap();
    assert!(matches!(cli.command, Command::Serve { .. }));
}
