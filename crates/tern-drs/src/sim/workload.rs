//! Workloads the simulator replays: hosts, VMs with a demand sample per step, rules and
//! pools; and the seeded synthetic generator (VM sizes; steady, diurnal, bursty, office-hours
//! and batch demand shapes; VMs arriving and leaving).

use serde::{Deserialize, Serialize};

use crate::model::{
    Automation, Host, HostState, Pool, PoolCpu, PoolMemory, Rule, Shares, Vm, VmHostRelation,
};
use crate::rng::Rng;

/// MHz of one physical core in generated hosts (and of one vCPU's worth of demand).
pub const CORE_MHZ: f64 = 2600.0;

/// A cluster over time.
#[derive(Debug, Clone)]
pub struct Workload {
    /// What it is (shown in reports).
    pub name: String,
    pub step_s: u64,
    pub steps: usize,
    pub hosts: Vec<Host>,
    pub vms: Vec<WorkloadVm>,
    pub rules: Vec<Rule>,
    pub pools: Vec<Pool>,
}

/// A VM of a workload: its static description and its demand while it exists.
#[derive(Debug, Clone)]
pub struct WorkloadVm {
    /// Size, controls, pool, dirty rate; `host`, if set, is where the VM runs when it arrives
    /// (a replayed cluster's placement; else the policy places it); demand fields are
    /// ignored.
    pub vm: Vm,
    /// First step the VM exists (powered on and placed at this step).
    pub arrive_step: usize,
    /// CPU demand per step from `arrive_step` (the VM leaves after the last sample).
    pub cpu_mhz: Vec<f32>,
    /// Memory demand per step, same length as `cpu_mhz`.
    pub memory_mib: Vec<f32>,
}

impl WorkloadVm {
    /// First step after the VM has left.
    pub fn leave_step(&self) -> usize {
        self.arrive_step + self.cpu_mhz.len()
    }

    /// Whether the VM exists at `step`.
    pub fn alive(&self, step: usize) -> bool {
        step >= self.arrive_step && step < self.leave_step()
    }

    /// Demand at `step` (must be alive): `[cpu_mhz, memory_mib]`.
    pub fn demand(&self, step: usize) -> [f64; 2] {
        let i = step - self.arrive_step;
        [f64::from(self.cpu_mhz[i]), f64::from(self.memory_mib[i])]
    }
}

/// Demand shapes of generated VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// A level with small autocorrelated noise.
    Steady,
    /// A 24-hour sine around a level; phases cluster in a few "time zones".
    Diurnal,
    /// A low base with bursts of 15–60 minutes.
    Bursty,
    /// Low at night, a plateau in business hours, lunch dip.
    Office,
    /// High and flat for a few hours, then gone.
    Batch,
}

/// Mix of demand shapes (weights, need not sum to 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapeMix {
    pub steady: f64,
    pub diurnal: f64,
    pub bursty: f64,
    pub office: f64,
    pub batch: f64,
}

impl ShapeMix {
    /// The default synthetic mix: steady, diurnal and bursty.
    pub fn standard() -> ShapeMix {
        ShapeMix {
            steady: 0.4,
            diurnal: 0.35,
            bursty: 0.25,
            office: 0.0,
            batch: 0.0,
        }
    }

    /// A different shape for trace replay: office hours, batch jobs and bursts.
    pub fn enterprise() -> ShapeMix {
        ShapeMix {
            steady: 0.2,
            diurnal: 0.0,
            bursty: 0.3,
            office: 0.4,
            batch: 0.1,
        }
    }

    fn pick(&self, rng: &mut Rng) -> Shape {
        let w = [
            self.steady,
            self.diurnal,
            self.bursty,
            self.office,
            self.batch,
        ];
        [
            Shape::Steady,
            Shape::Diurnal,
            Shape::Bursty,
            Shape::Office,
            Shape::Batch,
        ][rng.weighted(&w)]
    }
}

/// Parameters of a synthetic cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyntheticSpec {
    pub hosts: usize,
    /// VMs present at any time (arrivals replace departures).
    pub vms: usize,
    pub seed: u64,
    pub steps: usize,
    pub step_s: u64,
    /// Hosts are sized so mean CPU demand is this fraction of cluster capacity.
    pub cpu_utilization: f64,
    /// Hosts are sized so mean memory demand is this fraction of cluster capacity.
    pub memory_utilization: f64,
    pub mix: ShapeMix,
    /// Fraction of VMs replaced per simulated day.
    pub churn_per_day: f64,
    /// Generate rules, pools, reservations and automation overrides.
    pub rules: bool,
    /// CPU generations among the hosts (0: no CPU model). With `g` > 0 the hosts are spread
    /// over `g` generations (x86-64 psABI levels v1…v4, each adding features), and each VM
    /// needs the features of a host it could have been created on (a host-model CPU, no EVC
    /// mode): a VM of the newest generation only runs on the newest hosts.
    #[serde(default)]
    pub cpu_generations: usize,
}

impl SyntheticSpec {
    /// A standard synthetic cluster: 5-minute steps, 55 % CPU and 60 % memory, 20 % churn
    /// a day, rules on.
    pub fn new(hosts: usize, vms: usize, steps: usize, seed: u64) -> SyntheticSpec {
        SyntheticSpec {
            hosts,
            vms,
            seed,
            steps,
            step_s: 300,
            cpu_utilization: 0.65,
            memory_utilization: 0.7,
            mix: ShapeMix::standard(),
            churn_per_day: 0.2,
            rules: true,
            cpu_generations: 0,
        }
    }
}

/// Generates a synthetic workload. Same spec, same workload.
pub fn synthetic(spec: &SyntheticSpec) -> Workload {
    let rng = Rng::new(spec.seed);
    let steps = spec.steps.max(1);
    let days = steps as f64 * spec.step_s as f64 / 86_400.0;
    let churn = (spec.vms as f64 * spec.churn_per_day * days).round() as usize;
    let mut vms = Vec::with_capacity(spec.vms + churn);
    let mut timing = rng.fork(1);
    let mut leave_at = vec![steps; spec.vms];
    // `churn` of the initial VMs leave at random steps; as many newcomers arrive.
    let mut order: Vec<usize> = (0..spec.vms).collect();
    timing.shuffle(&mut order);
    for &i in order.iter().take(churn.min(spec.vms)) {
        leave_at[i] = 1 + timing.below(steps.saturating_sub(1).max(1));
    }
    for (i, leave) in leave_at.iter().enumerate() {
        vms.push(generate_vm(spec, &rng, i, 0, *leave));
    }
    for k in 0..churn {
        let arrive = 1 + timing.below(steps.saturating_sub(1).max(1));
        let i = spec.vms + k;
        let mut vm = generate_vm(spec, &rng, i, arrive, steps);
        if vm.cpu_mhz.is_empty() {
            vm = generate_vm(spec, &rng, i, steps - 1, steps);
        }
        vms.push(vm);
    }
    let hosts = size_hosts(
        &vms,
        steps,
        spec.hosts,
        spec.cpu_utilization,
        spec.memory_utilization,
        spec.seed,
    );
    let mut w = Workload {
        name: format!(
            "synthetic {} hosts / {} VMs, seed {}",
            spec.hosts, spec.vms, spec.seed
        ),
        step_s: spec.step_s,
        steps,
        hosts,
        vms,
        rules: Vec::new(),
        pools: Vec::new(),
    };
    if spec.rules {
        add_rules(&mut w, &mut rng.fork(2));
    }
    if spec.cpu_generations > 0 {
        add_cpu_generations(&mut w, spec.cpu_generations, &mut rng.fork(4));
    }
    w
}

/// Features each x86-64 psABI level adds to the one before.
const CPU_LEVELS: [&[&str]; 4] = [
    &["cx8", "cmov", "fxsr", "mmx", "sse", "sse2"],
    &[
        "cx16", "lahf_lm", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3",
    ],
    &[
        "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave",
    ],
    &["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"],
];

fn level_features(level: usize) -> Vec<String> {
    CPU_LEVELS[..=level.min(CPU_LEVELS.len() - 1)]
        .iter()
        .flat_map(|l| l.iter().map(|f| f.to_string()))
        .collect()
}

/// Spreads the hosts over `generations` CPU levels (the newest fewest: a cluster being
/// refreshed) and gives each VM the level of a host drawn at random.
fn add_cpu_generations(w: &mut Workload, generations: usize, rng: &mut Rng) {
    let g = generations.min(CPU_LEVELS.len());
    let nh = w.hosts.len();
    let mut levels = Vec::with_capacity(nh);
    for (i, h) in w.hosts.iter_mut().enumerate() {
        // Oldest generation first: host i of n gets level ⌊i·g/n⌋.
        let level = i * g / nh.max(1);
        h.cpu_features = Some(level_features(level));
        levels.push(level);
    }
    for wv in &mut w.vms {
        let level = levels[rng.below(nh.max(1))];
        wv.vm.cpu_features = level_features(level);
    }
}

fn generate_vm(
    spec: &SyntheticSpec,
    root: &Rng,
    i: usize,
    arrive: usize,
    leave: usize,
) -> WorkloadVm {
    let mut r = root.fork(1000 + i as u64);
    let vcpus = [1u32, 2, 4, 8, 16][r.weighted(&[0.2, 0.35, 0.3, 0.12, 0.03])];
    let gib_per_vcpu = [2.0, 4.0, 8.0][r.weighted(&[0.3, 0.5, 0.2])];
    let memory_mib = f64::from(vcpus) * gib_per_vcpu * 1024.0;
    let mut shape = spec.mix.pick(&mut r);
    let mut leave = leave;
    if shape == Shape::Batch {
        // Batch jobs run a few hours; long-lived VMs with this shape become bursty.
        if arrive == 0 && leave == spec.steps {
            shape = Shape::Bursty;
        } else {
            let hours = r.range_f64(1.0, 8.0);
            let len = (hours * 3600.0 / spec.step_s as f64).ceil() as usize;
            leave = leave.min(arrive + len.max(1));
        }
    }
    let max_mhz = f64::from(vcpus) * CORE_MHZ;
    let n = leave.saturating_sub(arrive);
    let mut cpu = Vec::with_capacity(n);
    let mut mem = Vec::with_capacity(n);
    // Most users share a time zone: the cluster has a daily peak, as real ones do.
    let zone = r.weighted(&[0.6, 0.2, 0.1, 0.1]) as f64;
    let phase = zone * std::f64::consts::PI / 2.0 + r.range_f64(-0.3, 0.3);
    let (level, amp) = match shape {
        Shape::Steady => (r.range_f64(0.1, 0.7), 0.0),
        Shape::Diurnal => {
            let l = r.range_f64(0.15, 0.55);
            (l, l * r.range_f64(0.3, 0.9))
        }
        Shape::Bursty => (r.range_f64(0.03, 0.15), 0.0),
        Shape::Office => (r.range_f64(0.3, 0.8), 0.0),
        Shape::Batch => (r.range_f64(0.6, 0.95), 0.0),
    };
    let burst_block = 3 + r.below(10);
    let burst_p = r.range_f64(0.05, 0.2);
    let burst_level = r.range_f64(0.5, 1.0);
    let mem_level = r.range_f64(0.3, 0.85);
    let mem_swing = match shape {
        Shape::Diurnal | Shape::Office => r.range_f64(0.05, 0.2),
        _ => 0.0,
    };
    let mut noise = 0.0;
    let mut mem_walk = 0.0;
    let tz_offset_h = zone * 3.0;
    for k in arrive..leave {
        let t = k as f64 * spec.step_s as f64;
        noise = 0.7 * noise + 0.3 * r.normal();
        mem_walk = (0.98 * mem_walk + 0.02 * r.normal()).clamp(-0.1, 0.1);
        let activity = match shape {
            Shape::Steady => level * (1.0 + 0.1 * noise),
            Shape::Diurnal => {
                level
                    + amp * (2.0 * std::f64::consts::PI * t / 86_400.0 + phase).sin()
                    + 0.05 * level * noise
            }
            Shape::Bursty => {
                let block = k / burst_block;
                let mut br = root.fork(0xB0B5_0000 + i as u64 * 1_000_003 + block as u64);
                if br.chance(burst_p) {
                    burst_level * (1.0 + 0.05 * noise)
                } else {
                    level * (1.0 + 0.2 * noise)
                }
            }
            Shape::Office => {
                let hour = ((t / 3600.0) + tz_offset_h) % 24.0;
                let day = if (8.0..18.0).contains(&hour) {
                    if (12.0..13.0).contains(&hour) {
                        0.6
                    } else {
                        1.0
                    }
                } else if (7.0..8.0).contains(&hour) || (18.0..19.0).contains(&hour) {
                    0.5
                } else {
                    0.1
                };
                level * day * (1.0 + 0.1 * noise)
            }
            Shape::Batch => level * (1.0 + 0.05 * noise),
        };
        let activity = activity.clamp(0.01, 1.0);
        cpu.push((activity * max_mhz) as f32);
        let rel = match shape {
            Shape::Diurnal | Shape::Office => (activity - level) / level.max(0.05),
            _ => 0.0,
        };
        let m = (mem_level * (1.0 + mem_swing * rel.clamp(-1.0, 1.0)) + mem_walk).clamp(0.1, 1.0);
        mem.push((m * memory_mib) as f32);
    }
    let mut vm = Vm::new(format!("vm-{i:05}"), vcpus, memory_mib);
    // Busier guests dirty memory faster.
    vm.dirty_mib_per_s = (f64::from(vcpus) * r.range_f64(2.0, 25.0) * (0.5 + level)).round();
    WorkloadVm {
        vm,
        arrive_step: arrive,
        cpu_mhz: cpu,
        memory_mib: mem,
    }
}

/// Sizes `n` hosts (two models, the larger 1.5× the smaller, two of one for each of the
/// other) so the workload's mean demand is the given fraction of capacity.
pub fn size_hosts(
    vms: &[WorkloadVm],
    steps: usize,
    n: usize,
    cpu_utilization: f64,
    memory_utilization: f64,
    seed: u64,
) -> Vec<Host> {
    let n = n.max(1);
    let mut total = [0.0f64; 2];
    for vm in vms {
        for (c, m) in vm.cpu_mhz.iter().zip(&vm.memory_mib) {
            total[0] += f64::from(*c);
            total[1] += f64::from(*m);
        }
    }
    let steps = steps.max(1) as f64;
    let mean_cpu = total[0] / steps;
    let mean_mem = total[1] / steps;
    let big = |i: usize| i % 3 == 2;
    let units: f64 = (0..n).map(|i| if big(i) { 1.5 } else { 1.0 }).sum();
    let cpu_unit = mean_cpu / cpu_utilization.max(0.01) / units;
    let mem_unit = mean_mem / memory_utilization.max(0.01) / units;
    let largest = vms.iter().map(|v| v.vm.memory_mib).fold(0.0, f64::max);
    let mut rng = Rng::new(seed).fork(3);
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    (0..n)
        .map(|k| {
            let i = order[k];
            let f = if big(i) { 1.5 } else { 1.0 };
            let cores = ((cpu_unit * f / CORE_MHZ) / 4.0).round().max(1.0) * 4.0;
            let mem_gib = ((mem_unit * f / 1024.0) / 64.0).round().max(1.0) * 64.0;
            Host {
                name: format!("h{:02}", k + 1),
                cpu_mhz: cores * CORE_MHZ,
                memory_mib: (mem_gib * 1024.0).max(largest * 2.0),
                state: HostState::Connected,
                groups: Vec::new(),
                cpu_features: None,
            }
        })
        .collect()
}

/// Adds host groups, rules, pools, reservations and automation overrides.
fn add_rules(w: &mut Workload, rng: &mut Rng) {
    let nh = w.hosts.len();
    for (i, h) in w.hosts.iter_mut().enumerate() {
        if i < nh.div_ceil(4) {
            h.groups.push("licensed".into());
        }
        h.groups
            .push(if i % 2 == 0 { "rack-a" } else { "rack-b" }.into());
    }
    // Long-lived VMs carry the rules (rules outlive their VMs otherwise).
    let mut long: Vec<usize> = (0..w.vms.len())
        .filter(|&i| w.vms[i].arrive_step == 0 && w.vms[i].leave_step() == w.steps)
        .collect();
    rng.shuffle(&mut long);
    let mut take = |count: usize| -> Vec<usize> {
        let k = count.min(long.len());
        long.drain(..k).collect()
    };
    let n = w.vms.len();
    let name = |w: &Workload, i: usize| w.vms[i].vm.name.clone();
    // Anti-affinity groups of 2–4 (3 % of VMs), never more members than hosts.
    let mut left = n * 3 / 100;
    let mut k = 0;
    while left >= 2 {
        let size = (2 + rng.below(3)).min(left).min(nh.max(2));
        let members = take(size);
        if members.len() < 2 {
            break;
        }
        left -= members.len();
        w.rules.push(Rule::AntiAffinity {
            name: format!("aa-{k}"),
            vms: members.iter().map(|&i| name(w, i)).collect(),
        });
        k += 1;
    }
    // Affinity pairs (1 %).
    for k in 0..(n / 200) {
        let members = take(2);
        if members.len() < 2 {
            break;
        }
        w.rules.push(Rule::Affinity {
            name: format!("af-{k}"),
            vms: members.iter().map(|&i| name(w, i)).collect(),
        });
    }
    let mut host_rule = |w: &mut Workload, rule: &str, group: &str, relation, count: usize| {
        let members = take(count);
        if !members.is_empty() {
            w.rules.push(Rule::VmHost {
                name: rule.into(),
                vms: members.iter().map(|&i| name(w, i)).collect(),
                host_group: group.into(),
                relation,
            });
        }
    };
    host_rule(
        w,
        "licensed-only",
        "licensed",
        VmHostRelation::MustRunOn,
        n * 2 / 100,
    );
    host_rule(
        w,
        "not-licensed",
        "licensed",
        VmHostRelation::MustNotRunOn,
        n / 100,
    );
    host_rule(
        w,
        "prefer-rack-a",
        "rack-a",
        VmHostRelation::ShouldRunOn,
        n * 3 / 100,
    );
    w.pools = vec![
        Pool {
            name: "prod".into(),
            parent: None,
            cpu: PoolCpu {
                shares: Shares::High,
                ..Default::default()
            },
            memory: PoolMemory {
                shares: Shares::High,
                ..Default::default()
            },
        },
        Pool {
            name: "dev".into(),
            parent: None,
            cpu: PoolCpu {
                shares: Shares::Low,
                ..Default::default()
            },
            memory: PoolMemory::default(),
        },
        Pool {
            name: "batch".into(),
            parent: Some("dev".into()),
            cpu: PoolCpu {
                shares: Shares::Low,
                ..Default::default()
            },
            memory: PoolMemory::default(),
        },
    ];
    for wv in &mut w.vms {
        let vm = &mut wv.vm;
        vm.pool = Some(["prod", "dev", "batch"][rng.weighted(&[0.5, 0.3, 0.2])].into());
        if rng.chance(0.1) {
            vm.memory_reservation_mib = (vm.memory_mib * rng.range_f64(0.5, 1.0)).round();
        }
        if rng.chance(0.05) {
            vm.cpu_reservation_mhz =
                (f64::from(vm.vcpus) * CORE_MHZ * rng.range_f64(0.2, 0.5)).round();
        }
        if rng.chance(0.05) {
            vm.cpu_shares = Shares::High;
        }
        let a = rng.f64();
        if a < 0.01 {
            vm.automation = Some(Automation::Disabled);
        } else if a < 0.02 {
            vm.automation = Some(Automation::Manual);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_is_deterministic_and_sized_to_utilization() {
        let spec = SyntheticSpec::new(8, 200, 96, 11);
        let a = synthetic(&spec);
        let b = synthetic(&spec);
        assert_eq!(a.vms.len(), b.vms.len());
        for (x, y) in a.vms.iter().zip(&b.vms) {
            assert_eq!(x.cpu_mhz, y.cpu_mhz);
            assert_eq!(x.arrive_step, y.arrive_step);
        }
        assert_eq!(a.hosts, b.hosts);
        let cap: f64 = a.hosts.iter().map(|h| h.cpu_mhz).sum();
        let mean: f64 = (0..a.steps)
            .map(|k| {
                a.vms
                    .iter()
                    .filter(|v| v.alive(k))
                    .map(|v| v.demand(k)[0])
                    .sum::<f64>()
            })
            .sum::<f64>()
            / a.steps as f64;
        let u = mean / cap;
        assert!((0.45..0.65).contains(&u), "cpu utilization {u}");
        let other = synthetic(&SyntheticSpec::new(8, 200, 96, 12));
        assert_ne!(a.vms[0].cpu_mhz, other.vms[0].cpu_mhz);
        assert!(!a.rules.is_empty() && !a.pools.is_empty());
    }
}
