//! `ferry group …`: named sets of DPs that receive the same packages.

use clap::Subcommand;
use ferry_site::api::{GroupRequest, MembersRequest};
use ferry_site::registry::GroupRecord;
use reqwest::Method;
use std::collections::BTreeMap;

use crate::client::Client;
use crate::output::{print_json, table};
use crate::Global;

#[derive(Subcommand, Debug)]
pub(crate) enum GroupCmd {
    /// Create an empty group.
    Create {
        /// The group's name.
        name: String,
    },
    /// Add DPs to a group; they receive its packages from then on.
    Add {
        /// The group.
        group: String,
        /// DPs to add.
        #[arg(required = true)]
        dps: Vec<String>,
    },
    /// Every group with its members and packages.
    List,
}

pub(crate) async fn run(cmd: GroupCmd, g: &Global) -> anyhow::Result<()> {
    let client = Client::new(g)?;
    match cmd {
        GroupCmd::Create { name } => {
            client
                .send(
                    client
                        .request(Method::POST, "/groups")
                        .json(&GroupRequest { name: name.clone() }),
                )
                .await?;
            println!("group {name} created");
        }
        GroupCmd::Add { group, dps } => {
            client
                .send(
                    client
                        .request(Method::POST, &format!("/groups/{group}/members"))
                        .json(&MembersRequest { dps: dps.clone() }),
                )
                .await?;
            println!("added {} to {group}", dps.join(", "));
        }
        GroupCmd::List => {
            let groups: BTreeMap<String, GroupRecord> =
                client.json(client.request(Method::GET, "/groups")).await?;
            if g.json {
                return print_json(&groups);
            }
            let mut t = table(&["GROUP", "MEMBERS", "PACKAGES"]);
            for (name, gr) in &groups {
                t.add_row(vec![
                    name.clone(),
                    gr.members.iter().cloned().collect::<Vec<_>>().join(","),
                    gr.packages.iter().cloned().collect::<Vec<_>>().join(","),
                ]);
            }
            println!("{t}");
        }
    }
    Ok(())
}
