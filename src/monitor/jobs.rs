//! QEMU's job model for the snapshot commands (`snapshot-save`, `snapshot-load`,
//! `snapshot-delete`, QEMU 6.0+): a job is created, runs, and concludes, with a
//! `JOB_STATUS_CHANGE` event at every step. Snapshot jobs neither auto-finalize nor
//! auto-dismiss: a successful one goes created → running → waiting → pending → concluded, a
//! failed one created → running → aborting → concluded with its error kept for `query-jobs`,
//! and `job-dismiss` removes a concluded job (status `null`).

use std::sync::{Mutex, MutexGuard};

use serde_json::{json, Value};

use super::events;

/// A job's state (QEMU's `JobStatus` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Registered, not yet started.
    Created,
    /// Working.
    Running,
    /// Done, waiting for the other jobs of its transaction (none here).
    Waiting,
    /// Waiting to be finalized.
    Pending,
    /// Failing.
    Aborting,
    /// Finished; kept until dismissed.
    Concluded,
}

impl JobStatus {
    /// QEMU's name.
    pub fn name(self) -> &'static str {
        match self {
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
        }
    }
}

/// Errors of the job commands (QEMU's messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// No job has this id.
    #[error("Job not found")]
    NotFound,
    /// The id is taken by a job not yet dismissed.
    #[error("Job ID '{0}' already in use")]
    InUse(String),
    /// The id is not a QEMU identifier.
    #[error("Invalid job ID '{0}'")]
    BadId(String),
    /// The job's state does not allow the verb.
    #[error("Job '{id}' in state '{status}' cannot accept command verb '{verb}'")]
    Verb {
        /// The job.
        id: String,
        /// Its state.
        status: &'static str,
        /// The verb (`dismiss`, `cancel`).
        verb: &'static str,
    },
}

#[derive(Debug, Clone)]
struct Job {
    id: String,
    kind: &'static str,
    status: JobStatus,
    error: Option<String>,
}

static JOBS: Mutex<Vec<Job>> = Mutex::new(Vec::new());

fn jobs() -> MutexGuard<'static, Vec<Job>> {
    JOBS.lock().unwrap_or_else(|e| e.into_inner())
}

/// QEMU's `id_wellformed`: a letter first, then letters, digits, `-`, `.`, `_`.
fn well_formed(id: &str) -> bool {
    let mut c = id.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic())
        && c.all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '.' | '_'))
}

fn set(id: &str, status: JobStatus, error: Option<String>) {
    if let Some(j) = jobs().iter_mut().find(|j| j.id == id) {
        j.status = status;
        if error.is_some() {
            j.error = error;
        }
    }
    events::emit(
        "JOB_STATUS_CHANGE",
        Some(json!({"status": status.name(), "id": id})),
    );
}

/// Registers job `id` of `kind` (status `created`); fails on a bad or taken id.
pub fn create(id: &str, kind: &'static str) -> Result<(), JobError> {
    if !well_formed(id) {
        return Err(JobError::BadId(id.to_string()));
    }
    {
        let mut all = jobs();
        if all.iter().any(|j| j.id == id) {
            return Err(JobError::InUse(id.to_string()));
        }
        all.push(Job {
            id: id.to_string(),
            kind,
            status: JobStatus::Created,
            error: None,
        });
    }
    events::emit(
        "JOB_STATUS_CHANGE",
        Some(json!({"status": "created", "id": id})),
    );
    Ok(())
}

/// Runs the work of job `id` (created by [`create`]) and concludes it with its outcome.
pub fn run(id: &str, work: impl FnOnce() -> Result<(), String>) {
    set(id, JobStatus::Running, None);
    match work() {
        Ok(()) => {
            set(id, JobStatus::Waiting, None);
            set(id, JobStatus::Pending, None);
            set(id, JobStatus::Concluded, None);
        }
        Err(e) => {
            set(id, JobStatus::Aborting, Some(e));
            set(id, JobStatus::Concluded, None);
        }
    }
}

/// `query-jobs`: every job not yet dismissed, QEMU 7.2's `JobInfo` shape.
pub fn query() -> Value {
    let list: Vec<Value> = jobs()
        .iter()
        .map(|j| {
            let done = u64::from(j.status == JobStatus::Concluded);
            let mut v = json!({
                "current-progress": done,
                "status": j.status.name(),
                "total-progress": 1,
                "type": j.kind,
                "id": j.id,
            });
            if let Some(e) = &j.error {
                v["error"] = json!(e);
            }
            v
        })
        .collect();
    Value::Array(list)
}

/// `job-dismiss`: removes a concluded job.
pub fn dismiss(id: &str) -> Result<(), JobError> {
    {
        let mut all = jobs();
        let k = all
            .iter()
            .position(|j| j.id == id)
            .ok_or(JobError::NotFound)?;
        if all[k].status != JobStatus::Concluded {
            return Err(JobError::Verb {
                id: id.to_string(),
                status: all[k].status.name(),
                verb: "dismiss",
            });
        }
        all.remove(k);
    }
    events::emit(
        "JOB_STATUS_CHANGE",
        Some(json!({"status": "null", "id": id})),
    );
    Ok(())
}

/// `job-cancel`: a snapshot job runs to its end once started (its steps are all-or-nothing
/// already), so only unknown jobs and QEMU's refused states are answered differently.
pub fn cancel(id: &str) -> Result<(), JobError> {
    let all = jobs();
    let j = all.iter().find(|j| j.id == id).ok_or(JobError::NotFound)?;
    Err(JobError::Verb {
        id: id.to_string(),
        status: j.status.name(),
        verb: "cancel",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_lifecycle_and_errors_follow_qemu() {
        assert_eq!(
            create("1x", "snapshot-save"),
            Err(JobError::BadId("1x".into()))
        );
        create("t-job", "snapshot-delete").unwrap();
        assert_eq!(
            create("t-job", "snapshot-delete"),
            Err(JobError::InUse("t-job".into()))
        );
        assert_eq!(
            dismiss("t-job").unwrap_err().to_string(),
            "Job 't-job' in state 'created' cannot accept command verb 'dismiss'"
        );
        run("t-job", || Err("boom".to_string()));
        let q = query();
        let j = q
            .as_array()
            .unwrap()
            .iter()
            .find(|j| j["id"] == "t-job")
            .unwrap();
        assert_eq!(j["status"], "concluded");
        assert_eq!(j["error"], "boom");
        assert_eq!(j["type"], "snapshot-delete");
        dismiss("t-job").unwrap();
        assert_eq!(dismiss("t-job"), Err(JobError::NotFound));
        assert_eq!(JobError::NotFound.to_string(), "Job not found");
    }
}
