//! The `authorization` block of a nats-server configuration that gives each
//! member of a fleet its role's permissions (`schema::roles`), as
//! `gpufleet auth` writes it and the tests start servers with.

use gpufleet_schema::roles::{Permissions, Role};

/// How the server recognises a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A public NKey (`U...`); the member holds the seed.
    NKey(String),
    /// A client certificate's subject as the server maps it with
    /// `verify_and_map` (for instance `CN=alice`).
    Certificate(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub role: Role,
    pub credential: Credential,
}

fn quoted(s: &str) -> String {
    // The server's configuration format reads JSON strings.
    serde_json::Value::String(s.to_string()).to_string()
}

fn list(items: &[String]) -> String {
    items
        .iter()
        .map(|s| quoted(s))
        .collect::<Vec<_>>()
        .join(", ")
}

fn permissions_block(p: &Permissions) -> String {
    let responses = if p.allow_responses {
        "\n        allow_responses: true"
    } else {
        ""
    };
    format!(
        "permissions: {{\n        publish: {{ allow: [{}] }}\n        subscribe: {{ allow: [{}] }}{responses}\n      }}",
        list(&p.publish),
        list(&p.subscribe)
    )
}

fn role_name(role: &Role) -> String {
    match role {
        Role::Coordinator => "coordinator".into(),
        Role::Worker(w) => format!("worker {w}"),
        Role::User(u) => format!("user {u}"),
        Role::Admin(u) => format!("admin {u}"),
    }
}

/// `authorization { users = [...] }` with one entry per member.
pub fn authorization_block(members: &[Member]) -> String {
    let mut out = String::from("authorization {\n  users = [\n");
    for m in members {
        let who = match &m.credential {
            Credential::NKey(key) => format!("nkey: {}", quoted(key)),
            Credential::Certificate(subject) => format!("user: {}", quoted(subject)),
        };
        out.push_str(&format!(
            "    # {}\n    {{\n      {who}\n      {}\n    }}\n",
            role_name(&m.role),
            permissions_block(&m.role.permissions())
        ));
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpufleet_schema::WorkerId;

    #[test]
    fn one_entry_per_member_with_its_permissions() {
        let block = authorization_block(&[
            Member {
                role: Role::Coordinator,
                credential: Credential::NKey("UCOORD".into()),
            },
            Member {
                role: Role::Worker(WorkerId::new("w1").unwrap()),
                credential: Credential::Certificate("CN=w1".into()),
            },
        ]);
        assert!(block.contains("nkey: \"UCOORD\""), "{block}");
        assert!(block.contains("user: \"CN=w1\""), "{block}");
        assert!(block.contains("\"$KV.gpufleet-leases.w1.>\""), "{block}");
        assert!(block.contains("# worker w1"), "{block}");
    }
}
