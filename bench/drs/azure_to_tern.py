#!/usr/bin/env python3
"""Convert Azure's public VM traces (AzurePublicDataset V1 2017 / V2 2019) to tern's trace
format (vms.csv + demand.csv; hosts are sized by `tern drs simulate --trace DIR --hosts N`).

Azure files have no header line:
  vmtable.csv:            vm id, subscription id, deployment id, created s, deleted s,
                          max cpu %, avg cpu %, p95 max cpu %, category,
                          core count bucket, memory GB bucket
  vm_cpu_readings-*.csv:  timestamp s, vm id, min cpu %, max cpu %, avg cpu %

tern's demand is cpu_mhz = avg cpu % / 100 × vcpus × --mhz-per-core. Azure has no memory
series: memory_mib is left empty, and the simulator holds it at 70 % of the VM's size.
Buckets such as ">24" cores or ">64" GB become 32 cores and 128 GB.

Example (the first day, 500 VMs alive at its start):
  azure_to_tern.py --vmtable vmtable.csv --readings vm_cpu_readings-file-1-of-195.csv \
      --hours 24 --max-vms 500 --out /tmp/azure-trace
  tern drs simulate --trace /tmp/azure-trace --hosts 16
"""

import argparse
import csv
import os
import sys


def bucket(value, above):
    value = value.strip()
    if value.startswith(">"):
        return above
    return float(value)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vmtable", required=True)
    p.add_argument("--readings", required=True, nargs="+", help="vm_cpu_readings files, in time order")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--start-s", type=int, default=0, help="window start (trace seconds)")
    p.add_argument("--hours", type=float, default=24.0, help="window length")
    p.add_argument("--max-vms", type=int, default=500, help="VMs alive at the window start to keep")
    p.add_argument("--mhz-per-core", type=float, default=2600.0)
    a = p.parse_args()
    end_s = a.start_s + a.hours * 3600

    vms = {}
    with open(a.vmtable, newline="") as f:
        for row in csv.reader(f):
            if len(row) < 11:
                continue
            vm_id, created, deleted = row[0], float(row[3]), float(row[4])
            if created <= a.start_s < deleted and len(vms) < a.max_vms:
                cores = bucket(row[9], 32.0)
                mem_gb = bucket(row[10], 128.0)
                vms[vm_id] = (f"az-{len(vms):05d}", int(cores), int(mem_gb * 1024))
    if not vms:
        sys.exit("no VM of the vmtable is alive at --start-s")

    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "vms.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["vm", "vcpus", "memory_mib"])
        for name, cores, mem_mib in vms.values():
            w.writerow([name, cores, mem_mib])

    rows = 0
    with open(os.path.join(a.out, "demand.csv"), "w", newline="") as out:
        w = csv.writer(out)
        w.writerow(["timestamp_s", "vm", "cpu_mhz", "memory_mib"])
        for path in a.readings:
            with open(path, newline="") as f:
                for row in csv.reader(f):
                    if len(row) < 5:
                        continue
                    t = float(row[0])
                    if t < a.start_s or t >= end_s:
                        continue
                    vm = vms.get(row[1])
                    if vm is None:
                        continue
                    name, cores, _ = vm
                    cpu_mhz = float(row[4]) / 100.0 * cores * a.mhz_per_core
                    w.writerow([int(t), name, round(cpu_mhz), ""])
                    rows += 1
    print(f"{len(vms)} VMs, {rows} samples -> {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
