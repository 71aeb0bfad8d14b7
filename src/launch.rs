//! `zeroshard launch --from slurm`: one command for every task of a job step.
//! Each task reads its place from the launcher's environment and becomes a
//! cluster member: rank 0 runs the coordinator (and, with `--head-worker`, a
//! worker too), every other rank a worker that registers with it. Every other
//! setting comes from the `ZEROSHARD_*` variables the job exports, which the
//! `coordinator` and `worker` subcommands read as they read their flags.

use anyhow::{bail, Context, Result};

use crate::args::{LaunchArgs, Launcher};

/// One task of a job step, as the launcher describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Task {
    pub rank: usize,
    pub tasks: usize,
    /// The task's index on its node (picks its GPU when it sees several).
    pub local_rank: usize,
    /// The host rank 0 runs on: everyone dials the coordinator there.
    pub head: String,
    /// The host this task runs on, as peers dial it.
    pub host: String,
    /// Tasks of the step on the busiest node (they share its memory).
    pub tasks_per_node: usize,
}

impl Task {
    /// The task from Slurm's variables (`SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`
    /// or `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_STEP_NODELIST` or
    /// `SLURM_JOB_NODELIST`, `SLURMD_NODENAME`).
    pub(crate) fn from_slurm(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let number = |names: &[&str]| -> Result<usize> {
            for n in names {
                if let Some(v) = var(n) {
                    return v.trim().parse().with_context(|| format!("{n}={v} is not a number"));
                }
            }
            bail!("{} is not set: run this under srun (inside sbatch or salloc)", names.join(" or "))
        };
        let rank = number(&["SLURM_PROCID"])?;
        let tasks = number(&["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"])?;
        let local_rank = number(&["SLURM_LOCALID"]).unwrap_or(0);
        let nodelist = var("SLURM_STEP_NODELIST")
            .or_else(|| var("SLURM_JOB_NODELIST"))
            .or_else(|| var("SLURM_NODELIST"))
            .context("SLURM_JOB_NODELIST is not set: run this under srun (inside sbatch or salloc)")?;
        let head = first_host(&nodelist)?;
        let host = match var("SLURMD_NODENAME") {
            Some(h) => h,
            None => hostname()?,
        };
        if tasks == 0 || rank >= tasks {
            bail!("SLURM_PROCID={rank} is not below the step's {tasks} tasks");
        }
        let tasks_per_node = var("SLURM_STEP_TASKS_PER_NODE")
            .or_else(|| var("SLURM_TASKS_PER_NODE"))
            .map_or(Some(tasks), |v| most_tasks_per_node(&v))
            .unwrap_or(tasks);
        Ok(Self { rank, tasks, local_rank, head, host, tasks_per_node })
    }
}

/// The first host of a Slurm hostlist: `gpu[03-08,11],cpu1` → `gpu03`,
/// `n[1-2]-ib` → `n1-ib`, `rack[2-3]n[07-09]` → `rack2n07`.
pub(crate) fn first_host(list: &str) -> Result<String> {
    let bad = |why: &str| anyhow::anyhow!("hostlist `{list}`: {why}");
    // The first element: up to a comma outside brackets.
    let mut depth = 0i32;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(bad("unbalanced brackets"));
        }
    }
    let mut rest = list[..end].trim();
    let mut host = String::new();
    while let Some(open) = rest.find('[') {
        let close = rest[open..].find(']').map(|c| open + c).ok_or_else(|| bad("unclosed `[`"))?;
        host.push_str(&rest[..open]);
        let first = rest[open + 1..close].split(',').next().unwrap_or_default();
        let start = first.split('-').next().unwrap_or_default().trim();
        if start.is_empty() || !start.chars().all(|c| c.is_ascii_digit()) {
            return Err(bad("a bracket does not start with a number"));
        }
        host.push_str(start);
        rest = &rest[close + 1..];
    }
    if rest.contains(']') {
        return Err(bad("unbalanced brackets"));
    }
    host.push_str(rest);
    if host.is_empty() {
        return Err(bad("no host"));
    }
    Ok(host)
}

/// The largest count of Slurm's tasks-per-node list: `4(x2),3` → 4.
fn most_tasks_per_node(list: &str) -> Option<usize> {
    list.split(',').map(|e| e.split('(').next().unwrap_or_default().trim().parse::<usize>().ok()).max()?
}

fn hostname() -> Result<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading this host's name")?;
    Ok(h.trim().to_string())
}

/// A process a task runs: a subcommand and the flags its place sets (the
/// rest comes from the environment).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Role {
    pub name: &'static str,
    pub args: Vec<String>,
}

/// What the launch flags and the environment ask of every task.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Setup {
    pub port: u16,
    pub head_worker: bool,
    /// `ca.pem`, `coordinator.{pem,key}`, `worker.{pem,key}`; plaintext without.
    pub certs: Option<std::path::PathBuf>,
    /// Overrides the head host (when Slurm's node names do not resolve).
    pub coordinator_host: Option<String>,
    /// Devices this task sees (`CUDA_VISIBLE_DEVICES`), when it lists several.
    pub visible_gpus: usize,
    /// `ZEROSHARD_DEVICE` as the job set it (None: auto).
    pub device: Option<String>,
    /// Workers on the CPU without ZEROSHARD_KV_CACHE_BYTES: this host's
    /// available memory, of which the node's tasks share half for KV caches.
    pub cpu_memory: Option<u64>,
    /// The certificate name workers of this host use in the certs folder:
    /// the host's own (`HOST.pem`: one identity per node) when there is one,
    /// else the shared `worker` (one identity for every worker).
    pub worker_cert: String,
}

/// The processes `task` runs.
pub(crate) fn roles(task: &Task, s: &Setup) -> Vec<Role> {
    let head = s.coordinator_host.clone().unwrap_or_else(|| task.head.clone());
    let scheme = if s.certs.is_some() { "grpcs" } else { "grpc" };
    let tls = |name: &str| -> Vec<String> {
        s.certs.as_ref().map_or_else(Vec::new, |d| {
            vec![
                format!("--tls-ca={}", d.join("ca.pem").display()),
                format!("--tls-cert={}", d.join(format!("{name}.pem")).display()),
                format!("--tls-key={}", d.join(format!("{name}.key")).display()),
            ]
        })
    };
    let worker = || {
        let mut args = vec![
            format!("--coordinator={scheme}://{head}:{}", s.port),
            "--listen=0.0.0.0:0".to_string(),
            format!("--advertise={}", task.host),
        ];
        // A task that sees several GPUs (--gres without --gpus-per-task) takes
        // the one of its index on the node.
        let auto = s.device.as_deref().is_none_or(|d| d == "auto" || d == "cuda");
        if auto && s.visible_gpus > 1 {
            args.push(format!("--device=cuda:{}", task.local_rank % s.visible_gpus));
        }
        if let Some(mem) = s.cpu_memory {
            // As `up` does for the workers of one host: half its memory, shared.
            let share = (mem / 2 / task.tasks_per_node.max(1) as u64).max(64 << 20);
            args.push(format!("--kv-cache-bytes={share}"));
        }
        args.extend(tls(&s.worker_cert));
        Role { name: "worker", args }
    };
    let workers = task.tasks - 1 + usize::from(s.head_worker);
    if task.rank == 0 {
        let mut args = vec![
            format!("--listen=0.0.0.0:{}", s.port),
            format!("--advertise={head}:{}", s.port),
            format!("--workers={workers}"),
        ];
        args.extend(tls("coordinator"));
        let mut r = vec![Role { name: "coordinator", args }];
        if s.head_worker {
            r.push(worker());
        }
        r
    } else {
        vec![worker()]
    }
}

/// `zeroshard launch`: becomes this task's member (exec), or with two roles
/// runs both and forwards the stop signals to them.
pub(crate) fn launch(a: LaunchArgs) -> Result<()> {
    let Launcher::Slurm = a.from;
    let task = Task::from_slurm(|n| std::env::var(n).ok())?;
    if a.certs_dir.is_none() && !env_true("ZEROSHARD_INSECURE") {
        bail!(
            "launch: members listen on 0.0.0.0 across hosts: give --certs-dir DIR (ca.pem, \
             coordinator.pem/.key, worker.pem/.key from `zeroshard certs`), or set ZEROSHARD_INSECURE=1 \
             for plaintext on a trusted job network"
        );
    }
    let own = |d: &std::path::Path| d.join(format!("{}.pem", task.host)).is_file();
    let worker_cert = match &a.certs_dir {
        Some(d) if own(d) => task.host.clone(),
        _ => "worker".to_string(),
    };
    if let Some(d) = &a.certs_dir {
        let cert = format!("{worker_cert}.pem");
        let key = format!("{worker_cert}.key");
        for f in ["ca.pem", "coordinator.pem", "coordinator.key", cert.as_str(), key.as_str()] {
            if !d.join(f).is_file() {
                bail!(
                    "--certs-dir {}: {f} is missing (workers use HOST.pem/.key, one per node, else the shared worker.pem/.key)",
                    d.display()
                );
            }
        }
    }
    let visible_gpus = std::env::var("CUDA_VISIBLE_DEVICES")
        .map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count())
        .unwrap_or(0);
    let device = std::env::var("ZEROSHARD_DEVICE").ok();
    let on_cpu = device.as_deref() == Some("cpu")
        || (visible_gpus == 0 && device.as_deref().is_none_or(|d| d == "auto"));
    let cpu_memory = (on_cpu && std::env::var_os("ZEROSHARD_KV_CACHE_BYTES").is_none())
        .then(zeroshard_worker::node::available_memory)
        .filter(|&m| m > 0);
    let setup = Setup {
        port: a.port,
        head_worker: a.head_worker,
        certs: a.certs_dir.clone(),
        coordinator_host: a.coordinator_host.clone(),
        visible_gpus,
        device,
        cpu_memory,
        worker_cert,
    };
    let roles = roles(&task, &setup);
    zeroshard_offload::errln!(
        "launch: task {} of {} on {} (coordinator on {}): {}",
        task.rank,
        task.tasks,
        task.host,
        setup.coordinator_host.as_deref().unwrap_or(&task.head),
        roles.iter().map(|r| format!("{} {}", r.name, r.args.join(" "))).collect::<Vec<_>>().join(" + ")
    );
    if a.dry_run {
        return Ok(());
    }
    let exe = std::env::current_exe().context("locating the zeroshard binary")?;
    let command = |r: &Role| {
        let mut c = std::process::Command::new(&exe);
        c.arg(r.name).args(&r.args);
        c
    };
    if let [only] = roles.as_slice() {
        use std::os::unix::process::CommandExt;
        let e = command(only).exec();
        bail!("running {} {}: {e}", exe.display(), only.name);
    }
    let children = roles.iter().map(|r| (r.name, command(r))).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    let status = rt.block_on(zeroshard_coordinator::launcher::run_together(children))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

fn env_true(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "no" | "off" | "n" | "f"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slurm(vars: &[(&str, &str)]) -> Result<Task> {
        let vars: std::collections::HashMap<String, String> =
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Task::from_slurm(|n| vars.get(n).cloned())
    }

    #[test]
    fn the_first_host_of_a_hostlist() {
        for (list, first) in [
            ("node01", "node01"),
            ("a1,b2", "a1"),
            ("gpu[03-08,11],cpu1", "gpu03"),
            ("gpu[7]", "gpu7"),
            ("n[1-2]-ib", "n1-ib"),
            ("rack[2-3]n[07-09]", "rack2n07"),
            ("h-[0001-0004],x", "h-0001"),
            ("vm", "vm"),
        ] {
            assert_eq!(first_host(list).expect(list), first, "{list}");
        }
        for bad in ["", "n[", "n[a-b]", "n]1[", "[]"] {
            assert!(first_host(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_task_reads_its_place_from_slurm() {
        let t = slurm(&[
            ("SLURM_PROCID", "2"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_STEP_NUM_TASKS", "4"),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x2)"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gpu[03-04]"),
            ("SLURMD_NODENAME", "gpu04"),
        ])
        .expect("task");
        let want = Task {
            rank: 2,
            tasks: 4,
            local_rank: 1,
            head: "gpu03".into(),
            host: "gpu04".into(),
            tasks_per_node: 2,
        };
        assert_eq!(t, want);
        let e = slurm(&[("SLURM_NTASKS", "2")]).expect_err("no rank").to_string();
        assert!(e.contains("SLURM_PROCID") && e.contains("srun"), "{e}");
        let e = slurm(&[("SLURM_PROCID", "3"), ("SLURM_NTASKS", "3"), ("SLURM_JOB_NODELIST", "a")])
            .expect_err("rank past the tasks")
            .to_string();
        assert!(e.contains("not below"), "{e}");
    }

    fn task(rank: usize, local_rank: usize, host: &str) -> Task {
        Task { rank, tasks: 3, local_rank, head: "gpu03".into(), host: host.into(), tasks_per_node: 2 }
    }

    #[test]
    fn rank_zero_coordinates_and_the_rest_work() {
        let s = Setup { port: 50051, ..Setup::default() };
        let r0 = roles(&task(0, 0, "gpu03"), &s);
        assert_eq!(r0.len(), 1);
        assert_eq!(r0[0].name, "coordinator");
        assert_eq!(r0[0].args, ["--listen=0.0.0.0:50051", "--advertise=gpu03:50051", "--workers=2"]);
        let r2 = roles(&task(2, 1, "gpu04"), &s);
        assert_eq!(r2.len(), 1);
        assert_eq!(r2[0].name, "worker");
        assert_eq!(
            r2[0].args,
            ["--coordinator=grpc://gpu03:50051", "--listen=0.0.0.0:0", "--advertise=gpu04"]
        );
    }

    #[test]
    fn a_head_worker_counts_and_tls_comes_from_the_certs_folder() {
        let s = Setup {
            port: 7000,
            head_worker: true,
            certs: Some("/c".into()),
            coordinator_host: Some("head.ib".into()),
            visible_gpus: 4,
            device: None,
            cpu_memory: None,
            worker_cert: "worker".into(),
        };
        let r0 = roles(&task(0, 0, "gpu03"), &s);
        let names: Vec<_> = r0.iter().map(|r| r.name).collect();
        assert_eq!(names, ["coordinator", "worker"]);
        assert!(r0[0].args.contains(&"--workers=3".to_string()));
        assert!(r0[0].args.contains(&"--advertise=head.ib:7000".to_string()));
        assert!(r0[0].args.contains(&"--tls-cert=/c/coordinator.pem".to_string()));
        let w = &r0[1].args;
        assert!(w.contains(&"--coordinator=grpcs://head.ib:7000".to_string()), "{w:?}");
        assert!(w.contains(&"--tls-key=/c/worker.key".to_string()), "{w:?}");
        // Four GPUs visible to every task: local rank 1 takes cuda:1.
        let r1 = roles(&task(1, 1, "gpu03"), &s);
        assert!(r1[0].args.contains(&"--device=cuda:1".to_string()), "{:?}", r1[0].args);
        // One GPU per task (--gpus-per-task=1), or an explicit device: left alone.
        let one = Setup { visible_gpus: 1, ..s.clone() };
        assert!(!roles(&task(1, 1, "gpu03"), &one)[0].args.iter().any(|a| a.starts_with("--device")));
        let cpu = Setup { device: Some("cpu".into()), ..s.clone() };
        assert!(!roles(&task(1, 1, "gpu03"), &cpu)[0].args.iter().any(|a| a.starts_with("--device")));
        // A node with a certificate of its own uses it.
        let own = Setup { worker_cert: "gpu04".into(), ..s };
        let w = &roles(&task(1, 0, "gpu04"), &own)[0].args;
        assert!(w.contains(&"--tls-cert=/c/gpu04.pem".to_string()), "{w:?}");
    }

    #[test]
    fn cpu_workers_of_a_node_share_half_its_memory_for_kv_caches() {
        assert_eq!(most_tasks_per_node("4(x2),3"), Some(4));
        assert_eq!(most_tasks_per_node("3"), Some(3));
        assert_eq!(most_tasks_per_node("x"), None);
        let s = Setup { port: 1, cpu_memory: Some(8 << 30), ..Setup::default() };
        // Two tasks on the busiest node: 8 GiB / 2 / 2.
        let w = roles(&task(1, 0, "n1"), &s);
        assert!(w[0].args.contains(&format!("--kv-cache-bytes={}", 2u64 << 30)), "{:?}", w[0].args);
        // The coordinator holds no KV cache.
        assert!(!roles(&task(0, 0, "n1"), &s)[0].args.iter().any(|a| a.starts_with("--kv-cache")));
    }
}
