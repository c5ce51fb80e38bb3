//! libvirt hosts and the clones that live on them ([`crate::remote`] drives the host).
//!
//! ## The order of a remote clone (`clone BASE NAME --host H`)
//!
//! 1. The host must answer (`virsh version`, `pool-info`) before anything is written.
//! 2. One `BEGIN IMMEDIATE` transaction reserves the clone names (rows `pending`, owned by this
//!    process) and the base's replica on the host: a `ready` replica is used as it is; a missing
//!    one is inserted `pending` and owned by this process, which then uploads it; a `pending`
//!    one owned by a live process is waited for (the transaction ends, and this step is retried
//!    until that replica is `ready` or its owner is dead, when this process takes it over).
//!    So two controllers racing for one host upload the base once: the `(base, host)` row is
//!    the lock.
//! 3. The owner uploads the base (`vol-create-as`, `vol-upload --sparse`), streams it back
//!    (`vol-download`) through SHA-256, compares digest and length with the local file's, and
//!    marks the replica `ready`.
//! 4. Per clone: a qcow2 overlay is written locally (backing name: the replica's path on the
//!    host, backing format pinned), uploaded as a new volume, and its row marked `ready` in the
//!    transaction that also writes the audit record.
//!
//! On an error (the host went away, say) the process deletes its pending rows and, best
//! effort, the volumes it made: the registry is as it was. A process killed mid-way leaves
//! pending rows owned by a dead process and maybe volumes: a later clone takes the replica
//! over, and `gc` removes the rows and any `cowclone-` volume no record claims. A pending row is
//! never shown as a clone: a clone is registered and present, or absent.

use std::path::{Path, PathBuf};

use imagefmt::{ImageFormat, Qcow2Builder};
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::Serialize;
use serde_json::json;

use super::records::{self, path_text, ChainLink, CloneRecord, Kind};
use super::{error_chain, validate_name, Registry};
use crate::audit::{self, now_ns};
use crate::error::{RegistryError, Result};
use crate::registry::clones::CloneSpec;
use crate::remote::{self, HostPool};
use crate::store;

/// Default storage pool name on a host.
pub const DEFAULT_POOL: &str = "cowclone";

/// A registered libvirt host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HostRecord {
    /// Its name in this registry.
    pub name: String,
    /// Its libvirt URI.
    pub uri: String,
    /// The storage pool cowclone uses there.
    pub pool: String,
    /// The pool's directory on the host.
    pub pool_dir: PathBuf,
    /// Bases uploaded there.
    pub replicas: Vec<ReplicaRecord>,
    /// Clones living there, by name.
    pub clones: Vec<String>,
    /// When it was added, RFC 3339 UTC.
    pub created: String,
    #[serde(skip)]
    id: i64,
}

impl HostRecord {
    /// The host's pool, for [`crate::remote`] operations.
    pub fn pool(&self) -> HostPool {
        HostPool {
            host: self.name.clone(),
            uri: self.uri.clone(),
            pool: self.pool.clone(),
        }
    }
}

/// A base uploaded to a host and verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ReplicaRecord {
    /// The base's name.
    pub base: String,
    /// The volume's name in the pool.
    pub volume: String,
    /// The volume's path on the host (the backing name of the clones there).
    pub path: PathBuf,
    /// SHA-256 of the volume, checked against the local base after the upload.
    pub sha256: String,
    /// Its length in bytes.
    pub size: u64,
}

/// A clone living on a host: what `start`, `stop`, `status` and `rm` need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemoteClone {
    /// The clone's name.
    pub name: String,
    /// The host it lives on.
    pub host: String,
    /// The host's libvirt URI.
    pub uri: String,
    /// The host's pool.
    pub pool: String,
    /// The clone's volume.
    pub volume: String,
    /// The clone's qcow2 overlay on the host.
    pub path: PathBuf,
    /// The base it reads through.
    pub base: String,
    /// The base's replica on the host (the overlay's backing file).
    pub base_path: PathBuf,
    /// The base's format (pinned in the overlay and the domain XML).
    #[serde(serialize_with = "format_name")]
    pub base_format: ImageFormat,
    /// Guest-visible size.
    pub virtual_size: u64,
    /// Guest memory from the base, if it sets it.
    pub memory: Option<u64>,
    /// Guest CPUs from the base, if it sets them.
    pub cpus: Option<u32>,
    /// Where the domain's serial console is written, on the host (a file in the pool).
    pub serial_log: PathBuf,
}

fn format_name<S: serde::Serializer>(f: &ImageFormat, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(f.name())
}

impl RemoteClone {
    /// What a hypervisor driver needs to run it through libvirt on its host: the overlay over
    /// the replica, formats pinned; `run_dir` is a local directory for the domain XML and the
    /// command log.
    pub fn clone_record(&self, run_dir: PathBuf) -> CloneRecord {
        CloneRecord {
            name: self.name.clone(),
            kind: Kind::Clone,
            image: self.path.clone(),
            format: ImageFormat::Qcow2,
            chain: vec![ChainLink {
                name: self.base.clone(),
                path: self.base_path.clone(),
                format: self.base_format,
            }],
            dir: Some(run_dir),
            memory: self.memory,
            cpus: self.cpus,
            meta: Default::default(),
        }
    }

    /// The host's pool, for [`crate::remote`] operations.
    pub fn pool(&self) -> HostPool {
        HostPool {
            host: self.host.clone(),
            uri: self.uri.clone(),
            pool: self.pool.clone(),
        }
    }
}

/// What [`Registry::gc_hosts`] found (and did) on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HostGc {
    /// The host.
    pub host: String,
    /// Why it was not reconciled, if it was not (it did not answer, or stopped answering half-way):
    /// its records are unchanged.
    pub unreachable: Option<String>,
    /// `cowclone-` volumes no record claims: deleted (would be, in a dry run).
    pub removed_volumes: Vec<String>,
    /// Pending rows of dead processes: dropped (would be, in a dry run).
    pub dropped_pending: Vec<String>,
    /// Records whose volume the pool does not have.
    pub missing_volumes: Vec<String>,
}

const HOST_SELECT: &str = "SELECT id, name, uri, pool, pool_dir, created_ns FROM hosts";

fn host_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<HostRecord> {
    Ok(HostRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        uri: r.get(2)?,
        pool: r.get(3)?,
        pool_dir: PathBuf::from(r.get::<_, String>(4)?),
        created: audit::rfc3339(r.get(5)?),
        replicas: Vec::new(),
        clones: Vec::new(),
    })
}

fn fill_host(conn: &Connection, mut host: HostRecord) -> Result<HostRecord> {
    let mut stmt = conn.prepare(
        "SELECT i.name, r.volume, r.path, r.sha256, r.size FROM replicas r \
         JOIN images i ON i.id = r.base_id WHERE r.host_id = ?1 AND r.state = 'ready' \
         ORDER BY i.name",
    )?;
    host.replicas = stmt
        .query_map([host.id], |r| {
            Ok(ReplicaRecord {
                base: r.get(0)?,
                volume: r.get(1)?,
                path: PathBuf::from(r.get::<_, String>(2)?),
                sha256: r.get(3)?,
                size: r.get::<_, i64>(4)? as u64,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut stmt = conn.prepare(
        "SELECT name FROM remote_clones WHERE host_id = ?1 AND state = 'ready' ORDER BY name",
    )?;
    host.clones = stmt
        .query_map([host.id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(host)
}

fn find_host(conn: &Connection, name: &str) -> Result<Option<HostRecord>> {
    let host = conn
        .query_row(
            &format!("{HOST_SELECT} WHERE name = ?1"),
            [name],
            host_from_row,
        )
        .optional()?;
    host.map(|h| fill_host(conn, h)).transpose()
}

fn get_host(conn: &Connection, name: &str) -> Result<HostRecord> {
    find_host(conn, name)?.ok_or_else(|| RegistryError::NotFound {
        name: format!("host {name}"),
    })
}

/// The ready remote clone `name`, if any.
fn find_remote(conn: &Connection, name: &str) -> Result<Option<RemoteClone>> {
    let row = conn
        .query_row(
            "SELECT c.name, h.name, h.uri, h.pool, h.pool_dir, c.volume, c.path, r.base_id, \
             r.path, c.virtual_size FROM remote_clones c JOIN hosts h ON h.id = c.host_id \
             JOIN replicas r ON r.id = c.replica_id WHERE c.name = ?1 AND c.state = 'ready'",
            [name],
            |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, String>(8)?,
                    r.get::<_, i64>(9)?,
                ))
            },
        )
        .optional()?;
    let Some((name, host, uri, pool, pool_dir, volume, path, base_id, base_path, size)) = row
    else {
        return Ok(None);
    };
    let base = records::by_id(conn, base_id)?;
    Ok(Some(RemoteClone {
        serial_log: Path::new(&pool_dir).join(remote::serial_volume(&name)),
        name,
        host,
        uri,
        pool,
        volume,
        path: PathBuf::from(path),
        base: base.name,
        base_path: PathBuf::from(base_path),
        base_format: base.format,
        virtual_size: size as u64,
        memory: base.memory,
        cpus: base.cpus,
    }))
}

/// Whether `name` is taken by a clone on a host (ready or being made).
pub(crate) fn is_remote_name(conn: &Connection, name: &str) -> Result<bool> {
    let count: i64 = conn.query_row(
        "SELECT COUNT(*) FROM remote_clones WHERE name = ?1",
        [name],
        |r| r.get(0),
    )?;
    Ok(count > 0)
}

/// How a replica reservation came out.
enum Replica {
    /// Verified on the host: its id and path there.
    Ready(i64, PathBuf),
    /// This process owns the pending row and must upload it.
    Upload(i64, String),
    /// Another live process is uploading it.
    Wait,
}

impl Registry {
    /// Registers host `name` at libvirt `uri`, using storage pool `pool` there: the host must
    /// answer; a missing pool is created as a directory pool at `pool_dir` (default
    /// `/var/lib/libvirt/images/POOL`).
    pub fn add_host(
        &mut self,
        name: &str,
        uri: &str,
        pool: Option<&str>,
        pool_dir: Option<&Path>,
    ) -> Result<HostRecord> {
        let pool = pool.unwrap_or(DEFAULT_POOL).to_owned();
        let arguments = json!({ "name": name, "connect": uri, "pool": pool, "pool-dir": pool_dir });
        self.audited("host add", arguments, |tx, _| {
            validate_name(name)?;
            if find_host(tx, name)?.is_some() {
                return Err(RegistryError::NameTaken {
                    name: format!("host {name}"),
                });
            }
            let host = HostPool {
                host: name.to_owned(),
                uri: uri.to_owned(),
                pool: pool.clone(),
            };
            host.check_answers()?;
            let created = if host.pool_exists() {
                host.activate()?;
                false
            } else {
                let default = PathBuf::from(format!("/var/lib/libvirt/images/{pool}"));
                host.create_dir_pool(pool_dir.unwrap_or(&default))?;
                true
            };
            let dir = host.pool_dir()?;
            tx.execute(
                "INSERT INTO hosts (name, uri, pool, pool_dir, created_ns) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, uri, pool, path_text(&dir)?, now_ns()],
            )?;
            let record = get_host(tx, name)?;
            let detail = format!(
                "host {name} at {uri}, pool {pool} ({}{})",
                dir.display(),
                if created { ", created" } else { "" }
            );
            Ok((record, detail))
        })
    }

    /// Every registered host, by name.
    pub fn hosts(&self) -> Result<Vec<HostRecord>> {
        let mut stmt = self.conn.prepare(&format!("{HOST_SELECT} ORDER BY name"))?;
        let hosts: Vec<HostRecord> = stmt
            .query_map([], host_from_row)?
            .collect::<rusqlite::Result<_>>()?;
        hosts
            .into_iter()
            .map(|h| fill_host(&self.conn, h))
            .collect()
    }

    /// The host called `name`.
    pub fn host(&self, name: &str) -> Result<HostRecord> {
        get_host(&self.conn, name)
    }

    /// Removes host `name`: refused while clones live there; its replicas' volumes are deleted
    /// (the host must answer), the pool stays.
    pub fn remove_host(&mut self, name: &str) -> Result<HostRecord> {
        self.audited("host rm", json!({ "name": name }), |tx, _| {
            let host = get_host(tx, name)?;
            let pending: i64 = tx.query_row(
                "SELECT COUNT(*) FROM remote_clones WHERE host_id = ?1",
                [host.id],
                |r| r.get(0),
            )?;
            if !host.clones.is_empty() || pending > 0 {
                return Err(RegistryError::HasClones {
                    name: format!("host {name}"),
                    clones: host.clones.clone(),
                });
            }
            let pool = host.pool();
            pool.check_answers()?;
            let mut stmt = tx.prepare("SELECT volume FROM replicas WHERE host_id = ?1")?;
            let volumes: Vec<String> = stmt
                .query_map([host.id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            tx.execute("DELETE FROM replicas WHERE host_id = ?1", [host.id])?;
            tx.execute("DELETE FROM hosts WHERE id = ?1", [host.id])?;
            for volume in &volumes {
                pool.delete_if_present(volume)?;
            }
            let detail = format!("host {name}: {} replica volume(s) deleted", volumes.len());
            Ok((host, detail))
        })
    }

    /// The clone `name` if it lives on a host (`None` for local clones and unknown names).
    pub fn remote_clone(&self, name: &str) -> Result<Option<RemoteClone>> {
        find_remote(&self.conn, name)
    }

    /// Makes the clones `spec` asks for on host `host` (see the module docs for the order):
    /// all or none. Only `spec.source`, `spec.name` and `spec.count` apply.
    pub fn clone_remote(&mut self, spec: &CloneSpec, host: &str) -> Result<Vec<RemoteClone>> {
        let arguments = json!({
            "source": spec.source, "name": spec.name, "count": spec.count, "host": host,
        });
        let owner = remote::owner_token();
        let outcome = self.clone_remote_steps(spec, host, &owner, &arguments);
        if let Err(e) = &outcome {
            // Undo the reservations (rows only: volumes were removed where they were made).
            let _ = self.conn.execute(
                "DELETE FROM remote_clones WHERE owner = ?1 AND state = 'pending'",
                [&owner],
            );
            let _ = self.conn.execute(
                "DELETE FROM replicas WHERE owner = ?1 AND state = 'pending'",
                [&owner],
            );
            let _ = audit::record(&self.conn, "clone", &arguments, Err(&error_chain(e)));
        }
        outcome
    }

    fn clone_remote_steps(
        &mut self,
        spec: &CloneSpec,
        host_name: &str,
        owner: &str,
        arguments: &serde_json::Value,
    ) -> Result<Vec<RemoteClone>> {
        let names = spec.names()?;
        for name in &names {
            validate_name(name)?;
        }
        let host = get_host(&self.conn, host_name)?;
        let pool = host.pool();
        // 1. The host answers before anything is written.
        pool.check_answers()?;
        pool.activate()?;
        let base = records::get(&self.conn, &spec.source)?;
        if base.kind != Kind::Base || base.parent_id.is_some() {
            return Err(RegistryError::WrongKind {
                name: base.name.clone(),
                kind: base.kind.name(),
                expected: "base without a backing file (remote clones read through a replica)",
            });
        }
        if base.guarded {
            super::guard::check_unchanged(&base)?;
        } else {
            super::guard::check_readable(&base)?;
        }
        // 2. Reserve the names and the replica; wait for another controller's upload.
        let (replica_id, replica_path) = loop {
            let tx = store::write(&mut self.conn)?;
            let state = reserve(&tx, &names, &base, &host, owner)?;
            tx.commit()?;
            match state {
                Replica::Ready(id, path) => break (id, path),
                Replica::Upload(id, volume) => {
                    // 3. Upload and verify.
                    let path = pool.upload(&volume, &base.path)?;
                    let local = remote::local_sha256(&base.path)?;
                    let local_len = std::fs::metadata(&base.path)
                        .map_err(RegistryError::io(format!(
                            "reading {}",
                            base.path.display()
                        )))?
                        .len();
                    let (theirs, len) = pool.sha256(&volume)?;
                    if theirs != local || len != local_len {
                        let _ = pool.delete(&volume);
                        return Err(RegistryError::Remote {
                            host: host.name.clone(),
                            step: format!("verifying the replica of {}", base.name),
                            detail: format!(
                                "the host has {len} bytes with SHA-256 {theirs}; the base has \
                                 {local_len} bytes with SHA-256 {local}"
                            ),
                        });
                    }
                    let updated = self.conn.execute(
                        "UPDATE replicas SET state = 'ready', path = ?1, sha256 = ?2, size = ?3, \
                         owner = NULL WHERE id = ?4 AND owner = ?5",
                        params![path_text(&path)?, local, len as i64, id, owner],
                    )?;
                    if updated != 1 {
                        return Err(RegistryError::Remote {
                            host: host.name.clone(),
                            step: format!("recording the replica of {}", base.name),
                            detail: "another process took the upload over".into(),
                        });
                    }
                    break (id, path);
                }
                Replica::Wait => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        };
        // 4. The overlays: written here, uploaded there, registered.
        let backing = path_text(&replica_path)?.to_owned();
        let scratch = self.home.clones_dir();
        let mut made = Vec::new();
        let result = (|| {
            for name in &names {
                let volume = remote::clone_volume(name);
                let local = scratch.join(format!(
                    ".remote-{name}.{}{}",
                    std::process::id(),
                    imagefmt::new_file::TEMP_SUFFIX
                ));
                let created = Qcow2Builder::new(&local)
                    .backing(backing.clone())
                    .backing_format(base.format)
                    .without_opening_backing()
                    .size(base.virtual_size)
                    .create()
                    .map_err(RegistryError::image(format!(
                        "creating the overlay of {name}"
                    )));
                let uploaded = created.and_then(|_| pool.upload(&volume, &local));
                let _ = std::fs::remove_file(&local);
                let path = uploaded?;
                made.push(volume.clone());
                self.conn.execute(
                    "UPDATE remote_clones SET path = ?1 WHERE name = ?2 AND owner = ?3",
                    params![path_text(&path)?, name, owner],
                )?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            for volume in &made {
                let _ = pool.delete(volume);
            }
            return Err(e);
        }
        let tx = store::write(&mut self.conn)?;
        for name in &names {
            let updated = tx.execute(
                "UPDATE remote_clones SET state = 'ready', owner = NULL \
                 WHERE name = ?1 AND owner = ?2 AND replica_id = ?3",
                params![name, owner, replica_id],
            )?;
            if updated != 1 {
                return Err(RegistryError::Remote {
                    host: host.name.clone(),
                    step: format!("registering {name}"),
                    detail: "its reservation was dropped (by gc?)".into(),
                });
            }
        }
        let detail = format!(
            "{} clone(s) of {} on host {}",
            names.len(),
            base.name,
            host.name
        );
        audit::record(&tx, "clone", arguments, Ok(&detail))?;
        tx.commit()?;
        names
            .iter()
            .map(|n| {
                find_remote(&self.conn, n)?
                    .ok_or_else(|| RegistryError::NotFound { name: n.clone() })
            })
            .collect()
    }

    /// Removes the remote clones `names`: the host of each must answer and the domain must
    /// not be running; the rows go first (one transaction), then the volumes.
    pub fn remove_remote_clones(&mut self, names: &[String]) -> Result<Vec<RemoteClone>> {
        let arguments = json!({ "names": names, "remote": true });
        let removed = self.audited("rm", arguments, |tx, _| {
            let mut removed = Vec::new();
            for name in names {
                let clone = find_remote(tx, name)?
                    .ok_or_else(|| RegistryError::NotFound { name: name.clone() })?;
                let pool = clone.pool();
                pool.check_answers()?;
                if pool.domain_state(name)?.as_deref() == Some("running") {
                    return Err(RegistryError::Remote {
                        host: clone.host.clone(),
                        step: format!("removing {name}"),
                        detail: format!(
                            "its domain is running; stop it first (`cowclone stop {name}`)"
                        ),
                    });
                }
                tx.execute("DELETE FROM remote_clones WHERE name = ?1", [name])?;
                removed.push(clone);
            }
            let detail = format!("removed {} remote clone(s)", removed.len());
            Ok((removed, detail))
        })?;
        for clone in &removed {
            let pool = clone.pool();
            pool.delete_if_present(&clone.volume)?;
            pool.delete_if_present(&remote::serial_volume(&clone.name))?;
        }
        Ok(removed)
    }

    /// Reconciles the registry with each host's pool: pending rows of dead processes are
    /// dropped, `cowclone-` volumes no record claims are deleted, records whose volume is gone
    /// are reported. A host that does not answer is reported and nothing changes there.
    pub fn gc_hosts(&mut self, dry_run: bool) -> Result<Vec<HostGc>> {
        let hosts = self.hosts()?;
        let mut reports = Vec::new();
        for host in hosts {
            let mut report = HostGc {
                host: host.name.clone(),
                ..HostGc::default()
            };
            let pool = host.pool();
            if let Err(e) = pool.check_answers().and_then(|()| pool.volumes()) {
                report.unreachable = Some(e.to_string());
                reports.push(report);
                continue;
            }
            // A host that stops answering half-way is reported like one that never answered
            // (the transaction is rolled back; only unclaimed volumes may have gone).
            let reconciled = self.audited(
                "gc host",
                json!({ "host": host.name, "dry-run": dry_run }),
                |tx, _| {
                    reconcile(tx, &host, &pool, dry_run, &mut report)?;
                    let detail = format!(
                        "host {}: {} {} volume(s) and {} pending record(s); {} volume(s) missing",
                        host.name,
                        if dry_run { "would remove" } else { "removed" },
                        report.removed_volumes.len(),
                        report.dropped_pending.len(),
                        report.missing_volumes.len()
                    );
                    Ok(((), detail))
                },
            );
            if let Err(e) = reconciled {
                report = HostGc {
                    host: host.name.clone(),
                    unreachable: Some(error_chain(&e)),
                    ..HostGc::default()
                };
            }
            reports.push(report);
        }
        Ok(reports)
    }
}

/// Step 2 of a remote clone, in one write transaction: the names are reserved and the replica
/// found, claimed or waited for.
fn reserve(
    tx: &Transaction<'_>,
    names: &[String],
    base: &records::ImageRecord,
    host: &HostRecord,
    owner: &str,
) -> Result<Replica> {
    /// A `replicas` row: id, state, path (once ready), owner (while pending), volume.
    type Row = (i64, String, Option<String>, Option<String>, String);
    let replica: Option<Row> = tx
        .query_row(
            "SELECT id, state, path, owner, volume FROM replicas WHERE base_id = ?1 AND host_id = ?2",
            params![base.id, host.id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    // The names first: a taken name fails at once, even while another upload is waited for.
    let mut to_insert = Vec::new();
    for name in names {
        let ours: Option<String> = tx
            .query_row(
                "SELECT owner FROM remote_clones WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        if ours.as_deref() == Some(owner) {
            continue; // reserved by this process on an earlier pass
        }
        let stale = ours.as_deref().is_some_and(|o| !remote::owner_alive(o));
        if stale {
            tx.execute("DELETE FROM remote_clones WHERE name = ?1", [name])?;
        }
        let taken: i64 = tx.query_row(
            "SELECT (SELECT COUNT(*) FROM images WHERE name = ?1) + \
             (SELECT COUNT(*) FROM remote_clones WHERE name = ?1)",
            [name],
            |r| r.get(0),
        )?;
        if taken > 0 {
            return Err(RegistryError::NameTaken { name: name.clone() });
        }
        to_insert.push(name);
    }
    let outcome = match replica {
        Some((id, state, Some(path), _, _)) if state == "ready" => Replica::Ready(id, path.into()),
        Some((_, _, _, Some(other), _)) if other != owner && remote::owner_alive(&other) => {
            return Ok(Replica::Wait)
        }
        Some((id, _, _, _, volume)) => {
            // Pending, and its owner is dead (or is this process): take it over.
            tx.execute(
                "UPDATE replicas SET owner = ?1 WHERE id = ?2",
                params![owner, id],
            )?;
            Replica::Upload(id, volume)
        }
        None => {
            let volume = remote::replica_volume(&base.name, base.id);
            tx.execute(
                "INSERT INTO replicas (base_id, host_id, volume, state, owner, created_ns) \
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5)",
                params![base.id, host.id, volume, owner, now_ns()],
            )?;
            Replica::Upload(tx.last_insert_rowid(), volume)
        }
    };
    let replica_id = match &outcome {
        Replica::Ready(id, _) | Replica::Upload(id, _) => *id,
        Replica::Wait => unreachable!("returned above"),
    };
    for name in to_insert {
        tx.execute(
            "INSERT INTO remote_clones (name, host_id, replica_id, volume, virtual_size, state, \
             owner, created_ns) VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?7)",
            params![
                name,
                host.id,
                replica_id,
                remote::clone_volume(name),
                base.virtual_size as i64,
                owner,
                now_ns()
            ],
        )?;
    }
    Ok(outcome)
}

/// `gc` on one answering host, under the write lock.
fn reconcile(
    tx: &Transaction<'_>,
    host: &HostRecord,
    pool: &HostPool,
    dry_run: bool,
    report: &mut HostGc,
) -> Result<()> {
    // Pending rows whose owner is dead.
    for table in ["remote_clones", "replicas"] {
        let mut stmt = tx.prepare(&format!(
            "SELECT id, volume, owner FROM {table} WHERE host_id = ?1 AND state = 'pending'"
        ))?;
        let rows: Vec<(i64, String, Option<String>)> = stmt
            .query_map([host.id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (id, volume, owner) in rows {
            if owner.as_deref().is_some_and(remote::owner_alive) {
                continue;
            }
            let referenced: i64 = tx.query_row(
                "SELECT COUNT(*) FROM remote_clones WHERE replica_id = ?1",
                [id],
                |r| r.get(0),
            )?;
            if table == "replicas" && referenced > 0 {
                continue;
            }
            if !dry_run {
                tx.execute(&format!("DELETE FROM {table} WHERE id = ?1"), [id])?;
            }
            report.dropped_pending.push(volume);
        }
    }
    // Volumes claimed: every remaining row's volume (pending ones of live owners too), and the
    // serial logs of the clones.
    let mut claimed = std::collections::HashSet::new();
    for sql in [
        "SELECT volume, state FROM replicas WHERE host_id = ?1",
        "SELECT volume, state FROM remote_clones WHERE host_id = ?1",
    ] {
        let mut stmt = tx.prepare(sql)?;
        let rows: Vec<(String, String)> = stmt
            .query_map([host.id], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        for (volume, state) in rows {
            if dry_run && report.dropped_pending.contains(&volume) {
                continue;
            }
            claimed.insert((volume, state == "ready"));
        }
    }
    let mut stmt = tx.prepare("SELECT name FROM remote_clones WHERE host_id = ?1")?;
    let serials: Vec<String> = stmt
        .query_map([host.id], |r| r.get::<_, String>(0))?
        .map(|n| n.map(|n| remote::serial_volume(&n)))
        .collect::<rusqlite::Result<_>>()?;
    let volumes = pool.volumes()?;
    for volume in &volumes {
        let known = claimed.iter().any(|(v, _)| v == volume) || serials.contains(volume);
        if volume.starts_with(remote::VOLUME_PREFIX) && !known {
            if !dry_run {
                pool.delete(volume)?;
            }
            report.removed_volumes.push(volume.clone());
        }
    }
    for (volume, ready) in &claimed {
        if *ready && !volumes.contains(volume) {
            report.missing_volumes.push(volume.clone());
        }
    }
    report.missing_volumes.sort();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Home, RegisterBase};

    /// A registry with base `gold` and host `h` (inserted directly: no libvirt here).
    fn fixture(dir: &Path) -> (Registry, records::ImageRecord, HostRecord) {
        let disk = dir.join("gold.raw");
        std::fs::write(&disk, vec![7u8; 4096]).unwrap();
        let mut registry = Registry::open(&Home::at(dir.join("home"))).unwrap();
        registry
            .register_base(&RegisterBase::new("gold", &disk))
            .unwrap();
        registry
            .conn
            .execute(
                "INSERT INTO hosts (name, uri, pool, pool_dir, created_ns) \
                 VALUES ('h', 'qemu+tcp://192.0.2.1/system', 'cowclone', '/p', 0)",
                [],
            )
            .unwrap();
        let base = records::get(&registry.conn, "gold").unwrap();
        let host = get_host(&registry.conn, "h").unwrap();
        (registry, base, host)
    }

    fn reserve_as(registry: &mut Registry, names: &[&str], owner: &str) -> Result<Replica> {
        let (base, host) = (
            records::get(&registry.conn, "gold")?,
            get_host(&registry.conn, "h")?,
        );
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let tx = store::write(&mut registry.conn)?;
        let outcome = reserve(&tx, &names, &base, &host, owner)?;
        tx.commit()?;
        Ok(outcome)
    }

    #[test]
    fn the_base_host_row_is_the_upload_lock() {
        let dir = tempfile::tempdir().unwrap();
        let (mut registry, _, _) = fixture(dir.path());
        let alive = remote::owner_token();
        let (pid, start) = alive.split_once(':').unwrap();
        let dead = format!("{pid}:{}", start.parse::<u64>().unwrap() + 1);
        let other_dead = format!("{pid}:{}", start.parse::<u64>().unwrap() + 2);
        // The first controller uploads; a second one, while the first lives, waits.
        assert!(matches!(
            reserve_as(&mut registry, &["a"], &alive).unwrap(),
            Replica::Upload(..)
        ));
        assert!(matches!(
            reserve_as(&mut registry, &["b"], &dead).unwrap(),
            Replica::Wait
        ));
        // A name reserved by a live controller is taken, also for a local clone.
        assert!(matches!(
            reserve_as(&mut registry, &["a"], &dead),
            Err(RegistryError::NameTaken { .. })
        ));
        assert!(is_remote_name(&registry.conn, "a").unwrap());
        // The uploader dies: the next controller takes the replica over, and its names.
        registry
            .conn
            .execute("UPDATE replicas SET owner = ?1", [&dead])
            .unwrap();
        registry
            .conn
            .execute("UPDATE remote_clones SET owner = ?1", [&dead])
            .unwrap();
        assert!(matches!(
            reserve_as(&mut registry, &["a"], &other_dead).unwrap(),
            Replica::Upload(..)
        ));
        let owner: String = registry
            .conn
            .query_row("SELECT owner FROM replicas", [], |r| r.get(0))
            .unwrap();
        assert_eq!(owner, other_dead);
        // Once ready, everyone uses it; pending rows are not clones.
        registry
            .conn
            .execute(
                "UPDATE replicas SET state = 'ready', path = '/p/r', sha256 = 'x', size = 1",
                [],
            )
            .unwrap();
        assert!(matches!(
            reserve_as(&mut registry, &["c"], &alive).unwrap(),
            Replica::Ready(_, ref path) if path == Path::new("/p/r")
        ));
        assert!(registry.remote_clone("a").unwrap().is_none());
        assert!(registry.host("h").unwrap().clones.is_empty());
    }
}
