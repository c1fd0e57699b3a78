//! `gpufleet auth`: the credentials and the nats-server configuration of a
//! fleet with least privilege per role.
//!
//! Every member gets a bare NKey (its seed in a file only it should read)
//! and a settings file that points at it; the server's configuration lists
//! each public key with its role's permissions (`schema::roles`). The
//! coordinator also gets the key it signs reservations with, and every
//! worker trusts its public half. Why NKeys: they need no other tool
//! (`nsc`) and no operator JWTs, the server keeps no secret, and the same
//! kind of key signs reservations.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use gpufleet_natsutil::server_conf::{authorization_block, Credential, Member};
use gpufleet_schema::roles::Role;
use gpufleet_schema::{UserId, WorkerId};

#[derive(clap::Args, Debug)]
pub struct AuthArgs {
    /// The folder to write into (made if missing; files already there are
    /// never overwritten)
    #[arg(long)]
    out: PathBuf,
    /// Worker names, comma-separated (each worker runs with its own key)
    #[arg(long, value_delimiter = ',')]
    workers: Vec<String>,
    /// User names, comma-separated: each sees and acts on its own jobs
    #[arg(long, value_delimiter = ',')]
    users: Vec<String>,
    /// Admin names, comma-separated: they see and act on every job
    #[arg(long, value_delimiter = ',')]
    admins: Vec<String>,
    /// The address the server listens on
    #[arg(long, default_value = "0.0.0.0:4222")]
    listen: String,
    /// The server's JetStream store
    #[arg(long, default_value = "/var/lib/nats")]
    store_dir: PathBuf,
}

/// What to write: who is in the fleet and where the programs find NATS.
pub struct Spec {
    pub nats_url: String,
    pub workers: Vec<WorkerId>,
    pub users: Vec<UserId>,
    pub admins: Vec<UserId>,
    /// `listen` and `store_dir` for the server's configuration; without,
    /// only the `authorization` block (the server gets the rest by flags).
    pub server: Option<(String, PathBuf)>,
}

/// Where everything went.
pub struct Written {
    pub dir: PathBuf,
    pub server_conf: PathBuf,
    pub coordinator: PathBuf,
    /// (worker, its settings file).
    pub workers: Vec<(WorkerId, PathBuf)>,
    /// (user or admin, its settings file for the command line).
    pub users: Vec<(UserId, PathBuf)>,
}

fn names<T: std::str::FromStr<Err = gpufleet_schema::ids::IdError>>(
    flag: &str,
    list: &[String],
) -> anyhow::Result<Vec<T>> {
    list.iter()
        .filter(|n| !n.is_empty())
        .map(|n| n.parse::<T>().map_err(|e| anyhow::anyhow!("--{flag}: {e}")))
        .collect()
}

impl Spec {
    pub fn from_args(args: &AuthArgs, nats_url: String) -> anyhow::Result<Spec> {
        let spec = Spec {
            nats_url,
            workers: names("workers", &args.workers)?,
            users: names("users", &args.users)?,
            admins: names("admins", &args.admins)?,
            server: Some((args.listen.clone(), args.store_dir.clone())),
        };
        if spec.workers.is_empty() && spec.users.is_empty() && spec.admins.is_empty() {
            bail!("name at least one worker, user or admin (--workers, --users, --admins)");
        }
        let mut seen = std::collections::HashSet::new();
        for u in spec.users.iter().chain(&spec.admins) {
            if !seen.insert(u) {
                bail!("{u} is named twice among --users and --admins");
            }
        }
        Ok(spec)
    }
}

/// A fresh NKey, its seed written to `path` readable by its owner only.
fn new_key(path: &Path) -> anyhow::Result<nkeys::KeyPair> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let key = nkeys::KeyPair::new_user();
    let seed = key.seed().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{seed}")?;
    Ok(key)
}

/// Writes `text` to a new file `path`.
fn new_file(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn toml_str(s: &str) -> String {
    // A TOML basic string reads JSON's escapes.
    serde_json::Value::String(s.to_string()).to_string()
}

fn path_str(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

/// Writes the keys, the settings of every member and the server's
/// configuration into `dir`.
pub fn write(spec: &Spec, dir: &Path) -> anyhow::Result<Written> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let header = "# Written by `gpufleet auth`. The .nk files are secret keys: give each to its\n# program alone (mode 600). See the README's security model.\n";
    let url = toml_str(&spec.nats_url);
    let mut members = Vec::new();

    let coordinator_key = new_key(&dir.join("coordinator.nk"))?;
    members.push(Member {
        role: Role::Coordinator,
        credential: Credential::NKey(coordinator_key.public_key()),
    });
    let signing = new_key(&dir.join("signing.nk"))?;
    let admins: Vec<String> = spec.admins.iter().map(|a| toml_str(a.as_str())).collect();
    let coordinator = dir.join("coordinator.toml");
    new_file(
        &coordinator,
        &format!(
            "{header}nats_url = {url}\nnats_nkey = {}\nroles = true\nadmins = [{}]\n# Workers trust its public key, {}.\nsigning_key = {}\n",
            path_str(&dir.join("coordinator.nk")),
            admins.join(", "),
            signing.public_key(),
            path_str(&dir.join("signing.nk")),
        ),
    )?;

    let mut workers = Vec::new();
    for w in &spec.workers {
        let seed = dir.join(format!("worker-{w}.nk"));
        let key = new_key(&seed)?;
        members.push(Member {
            role: Role::Worker(w.clone()),
            credential: Credential::NKey(key.public_key()),
        });
        let file = dir.join(format!("worker-{w}.toml"));
        new_file(
            &file,
            &format!(
                "{header}nats_url = {url}\nnats_nkey = {}\nname = {}\ntrusted_keys = [{}]\n",
                path_str(&seed),
                toml_str(w.as_str()),
                toml_str(&signing.public_key()),
            ),
        )?;
        workers.push((w.clone(), file));
    }

    let mut users = Vec::new();
    let everyone = spec
        .users
        .iter()
        .map(|u| Role::User(u.clone()))
        .chain(spec.admins.iter().map(|u| Role::Admin(u.clone())));
    for role in everyone {
        let (Role::User(u) | Role::Admin(u)) = &role else {
            unreachable!("only users and admins here")
        };
        let seed = dir.join(format!("user-{u}.nk"));
        let key = new_key(&seed)?;
        let file = dir.join(format!("user-{u}.toml"));
        new_file(
            &file,
            &format!(
                "{header}nats_url = {url}\nnats_nkey = {}\nuser = {}\n",
                path_str(&seed),
                toml_str(u.as_str()),
            ),
        )?;
        users.push((u.clone(), file));
        members.push(Member {
            role,
            credential: Credential::NKey(key.public_key()),
        });
    }

    let mut conf = String::from(header);
    if let Some((listen, store)) = &spec.server {
        conf.push_str(&format!(
            "listen: {}\njetstream {{ store_dir: {} }}\n",
            toml_str(listen),
            path_str(store)
        ));
    }
    conf.push_str(&authorization_block(&members));
    let server_conf = dir.join("nats-server.conf");
    new_file(&server_conf, &conf)?;
    Ok(Written {
        dir,
        server_conf,
        coordinator,
        workers,
        users,
    })
}

/// `gpufleet auth`: writes the files and says how to use them.
pub fn run(args: &AuthArgs, nats_url: String) -> anyhow::Result<i32> {
    let spec = Spec::from_args(args, nats_url)?;
    let w = write(&spec, &args.out)?;
    println!("wrote a fleet's credentials to {}:", w.dir.display());
    println!("  nats-server -c {}", w.server_conf.display());
    println!(
        "  gpufleet-coordinator --config {}",
        w.coordinator.display()
    );
    for (name, file) in &w.workers {
        println!("  gpufleet-worker --config {}   # {name}", file.display());
    }
    for (name, file) in &w.users {
        println!(
            "  GPUFLEET_CONFIG={} gpufleet list   # {name}",
            file.display()
        );
    }
    Ok(crate::exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_member_gets_a_key_only_it_reads_and_settings_that_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            nats_url: "nats://h:4222".into(),
            workers: vec![WorkerId::new("gpu-1").unwrap()],
            users: vec![UserId::new("alice").unwrap()],
            admins: vec![UserId::new("root").unwrap()],
            server: None,
        };
        let w = write(&spec, dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("worker-gpu-1.nk"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let coordinator = std::fs::read_to_string(&w.coordinator).unwrap();
        assert!(coordinator.contains("roles = true"), "{coordinator}");
        assert!(coordinator.contains("admins = [\"root\"]"), "{coordinator}");
        let worker = std::fs::read_to_string(&w.workers[0].1).unwrap();
        let signing = nkeys::KeyPair::from_seed(
            gpufleet_natsutil::connect::read_nkey_seed(&dir.path().join("signing.nk"))
                .unwrap()
                .as_str(),
        )
        .unwrap();
        assert!(worker.contains(&signing.public_key()), "{worker}");
        let conf = std::fs::read_to_string(&w.server_conf).unwrap();
        assert_eq!(conf.matches("nkey: ").count(), 4, "{conf}");
        assert!(!conf.contains("listen"), "{conf}");
        // Never over what is there.
        assert!(write(&spec, dir.path()).is_err());
    }
}
