# Shared by the two-node benchmarks (sourced, not run): the lab, release
# agents, HAProxy certificates, wrk parsing. Every benchmark cleans up what
# it made on exit, even when interrupted.

# bench_init PREFIX WORKNAME [deps-env]: checks root, installs, builds the
# release agent, sets root/bin/work/prefix/cg/n1/n2 and the cleanup trap.
bench_init() {
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  prefix=$1
  export PATH="/opt/swift/usr/bin:$PATH"
  [ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
  PALISADE_BENCH=${PALISADE_BENCH:-1} "$root/tools/install-deps"
  # BENCH_BIN=FILE measures that build of the agent instead (A/B runs of
  # two builds with the same benchmark).
  if [ -n "${BENCH_BIN:-}" ]; then
    bin=$(realpath "$BENCH_BIN")
  else
    (cd "$root" && swift build -c release --product palisade >/dev/null)
    bin="$(cd "$root" && swift build -c release --show-bin-path)/palisade"
  fi
  work=$(mktemp -d "/tmp/palisade-bench-$2.XXXXXX")
  chmod 755 "$work"   # nginx workers (nobody) read the pages under it
  cg=$(awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts)/palisade-lab-$prefix
  n1=/run/netns/$prefix-n1; n2=/run/netns/$prefix-n2
  pids=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  bench_agents_cleanup
  "$root/tools/lab" down "$prefix"
  rm -rf "$work" "/sys/fs/bpf/palisade-$prefix-n1" "/sys/fs/bpf/palisade-$prefix-n2"
}

# bench_agent_config I: node I's agent configuration header (append workloads).
bench_agent_config() {
  cat > "$work/n$1.yaml" <<EOF
trustDomain: bench.local
nodeName: n$1
stateDir: $work/state-n$1
bpffs: /sys/fs/bpf/palisade-$prefix-n$1
metricsAddress: "off"
eventsPerSecond: 0
EOF
  mkdir -p "$work/state-n$1/policies"
}

# bench_pair_config [PORT...]: after bench_agent_config 1 and 2, workload a
# on node 1 and b on node 2 (mTLS strict), each known to the other node
# through its tunnel; with PORTs, b's policy lets a reach them.
bench_pair_config() {
  cat >> "$work/n1.yaml" <<CONF
workloads:
  - {name: a, spiffeID: "spiffe://bench.local/ns/default/sa/a", labels: {app: a}, addresses: ["10.101.1.2"], interface: ${prefix}a, cgroup: "$cg/a"}
nodes:
  - {name: n2, tunnelAddress: "10.200.0.2:15008"}
remoteWorkloads:
  - {name: b, spiffeID: "spiffe://bench.local/ns/default/sa/b", labels: {app: b}, addresses: ["10.102.1.2"], node: n2}
CONF
  cat >> "$work/n2.yaml" <<CONF
workloads:
  - {name: b, spiffeID: "spiffe://bench.local/ns/default/sa/b", labels: {app: b}, addresses: ["10.102.1.2"], interface: ${prefix}b, cgroup: "$cg/b", mtls: strict}
nodes:
  - {name: n1, tunnelAddress: "10.200.0.1:15008"}
remoteWorkloads:
  - {name: a, spiffeID: "spiffe://bench.local/ns/default/sa/a", labels: {app: a}, addresses: ["10.101.1.2"], node: n1}
CONF
  [ $# -gt 0 ] || return 0
  local ports
  ports=$(printf '{port: %s}, ' "$@")
  cat > "$work/state-n2/policies/b.yaml" <<CONF
apiVersion: palisade.dev/v1
kind: Policy
metadata: {name: b-from-a}
spec:
  selector: {labels: {app: b}}
  ingress:
    - from: [{labels: {app: a}}]
      ports: [${ports%, }]
CONF
}

# Starts node 1's agent, gives node 2 the same CA, starts node 2's.
bench_start_agents() {
  nsenter --net="$n1" "$bin" agent --config "$work/n1.yaml" > "$work/n1.log" 2>&1 & pids+=($!); agent_pids=($!)
  for _ in $(seq 100); do [ -f "$work/state-n1/ca/ca.pem" ] && break; sleep 0.1; done
  cp -r "$work/state-n1/ca" "$work/state-n2/ca"
  nsenter --net="$n2" "$bin" agent --config "$work/n2.yaml" > "$work/n2.log" 2>&1 & pids+=($!); agent_pids+=($!)
  # Ready: the first reconcile (workloads attached, redirects in place)
  # comes before the mTLS listener starts.
  for _ in $(seq 200); do
    grep -q "mTLS listener" "$work/n1.log" && grep -q "mTLS listener" "$work/n2.log" && break
    sleep 0.1
  done
  sleep 0.5
}

bench_stop_all() {
  kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; pids=()
}

bench_agents_cleanup() {
  for i in 1 2; do
    [ -f "$work/n$i.yaml" ] && nsenter --net="/run/netns/$prefix-n$i" "$bin" agent --config "$work/n$i.yaml" --cleanup >/dev/null 2>&1 || true
  done
}

# A CA and client/server certificates (P-256) for an HAProxy mTLS pair.
bench_certs() {
  (
    cd "$work"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=bench-ca 2>/dev/null
    for who in client server; do
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout $who.key -out $who.csr -subj /CN=$who 2>/dev/null
      openssl x509 -req -in $who.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $who.crt -days 1 2>/dev/null
      cat $who.crt $who.key > $who.pem
    done
  )
}

# wrk from workload a: "requests/s p50us p99us". $1: URL, then wrk arguments.
# ("Connection: close" needs its space: without it wrk keeps connections.)
http_run() {
  local url=$1 out; shift
  out=$("$root/tools/lab" exec "$prefix" a wrk -t1 -c16 -d"${secs}s" --latency "$@" "$url" 2>&1)
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1 == "50%" {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  echo "$rps $(to_us "$p50") $(to_us "$p99")"
}
to_us() {  # wrk prints 123.45us / 1.23ms / 1.2s
  awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else if (v ~ /s$/) print n * 1000000; else print "?" }'
}
# CPU seconds (user + system) the processes $@ have used so far.
cpu_seconds() {
  local ticks=0 p
  for p in "$@"; do ticks=$((ticks + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'
}
# Mean resident memory of the processes $@, kB.
rss_kb() {
  local sum=0 p
  for p in "$@"; do sum=$((sum + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status"))); done
  echo $((sum / $#))
}
# Open-loop load at a fixed rate from workload a (tools/bench/fixedrate.c):
# "p50us p90us p99us". $1 host, $2 port, $3 requests/s, $4 path (default /).
fixed_run() {
  local out
  out=$("$root/tools/lab" exec "$prefix" a "$work/fixedrate" "$1" "$2" "$3" "$secs" 10 "${4:-/}")
  [[ $out == *"errors=0 "* ]] || echo "fixed rate $3/s to $1:$2: $out" >&2
  sed -E 's/.* p50=([0-9]+) p90=([0-9]+) p99=([0-9]+).*/\1 \2 \3/' <<<"$out"
}
# The figures below are kept in the caller's associative array R, about
# the processes of the mesh under test in its array measured_pids (empty
# for the no-mesh baseline).
# CPU seconds the mesh's processes have used so far (0 without a mesh).
mesh_cpu_seconds() {
  if [ ${#measured_pids[@]} -gt 0 ]; then cpu_seconds "${measured_pids[@]}"; else echo 0; fi
}
# After a fixed-rate run of $2 requests/s for NAME ($1) that began when the
# mesh had used $3 CPU seconds: R[NAME.cpuRATE] (vCPU per 1,000 req/s) and
# R[NAME.rssRATE] (kB per process).
record_fixed_cost() {
  if [ ${#measured_pids[@]} -gt 0 ]; then
    R[$1.cpu$2]=$(awk -v a="$3" -v b="$(cpu_seconds "${measured_pids[@]}")" -v s="$secs" -v r="$2" 'BEGIN { printf "%.3f", (b - a) / s / (r / 1000) }')
    R[$1.rss$2]=$(rss_kb "${measured_pids[@]}")
  else
    R[$1.cpu$2]=0; R[$1.rss$2]=0
  fi
}
# Latency NAME ($1) added over no mesh at $2 requests/s: "p50/p90/p99".
added() {
  local a b; read -r -a a <<<"${R[$1.fixed$2]}"; read -r -a b <<<"${R[none.fixed$2]}"
  echo "$((a[0] - b[0]))/$((a[1] - b[1]))/$((a[2] - b[2]))"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "?" }'; }
