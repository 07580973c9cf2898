//! `ferry group …`: named sets of DPs that receive the same packages.

use clap::Subcommand;
use ferry_site::api::{GroupRequest, MembersRequest};
use ferry_site::distribution::records::GroupRecord;
use reqwest::Method;
use std::collections::BTreeMap;

use crate::client::Client;
use crate::output::{emit, print_json, table};
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
    /// Remove DPs from a group; the group's packages leave them (unless
    /// assigned to them otherwise).
    Remove {
        /// The group.
        group: String,
        /// DPs to remove.
        #[arg(required = true)]
        dps: Vec<String>,
    },
    /// Delete a group (refused while packages are assigned to it).
    Delete {
        /// The group.
        group: String,
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
            emit(
                g,
                &serde_json::json!({ "group": name, "created": true }),
                || println!("group {name} created"),
            )?;
        }
        GroupCmd::Add { group, dps } => {
            members(&client, &format!("/groups/{group}/members"), dps.clone()).await?;
            emit(
                g,
                &serde_json::json!({ "group": group, "added": dps }),
                || println!("added {} to {group}", dps.join(", ")),
            )?;
        }
        GroupCmd::Remove { group, dps } => {
            members(
                &client,
                &format!("/groups/{group}/members/remove"),
                dps.clone(),
            )
            .await?;
            emit(
                g,
                &serde_json::json!({ "group": group, "removed": dps }),
                || println!("removed {} from {group}", dps.join(", ")),
            )?;
        }
        GroupCmd::Delete { group } => {
            client
                .send(client.request(Method::DELETE, &format!("/groups/{group}")))
                .await?;
            emit(
                g,
                &serde_json::json!({ "group": group, "deleted": true }),
                || println!("group {group} deleted"),
            )?;
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

/// Sends a group's member change (`route`: add or remove).
async fn members(client: &Client, route: &str, dps: Vec<String>) -> anyhow::Result<()> {
    client
        .send(
            client
                .request(Method::POST, route)
                .json(&MembersRequest { dps }),
        )
        .await
        .map(drop)
}
