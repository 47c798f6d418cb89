# The real node of the local cluster (sourced by e2e/cluster; uses its variables and helpers): containerd and runc
# from Debian, the CNI bridge, a real kubelet and kube-proxy, CoreDNS for cluster.local, flowtel's images loaded.
# What it took on these machines is in ../shared/notes/container-runtime-facts.md and docs/development.md.
# shellcheck shell=bash

node_dir=$state/node
node_name=flowtel-real-node
node_cidr=10.245.0.0/24
node_gateway=10.245.0.1
node_bridge=flowtel0
containerd_sock=$node_dir/containerd.sock
kubelet_port=$((apiserver_port + 10))
kubelet_healthz_port=$((apiserver_port + 11))
proxy_metrics_port=$((apiserver_port + 12))
proxy_healthz_port=$((apiserver_port + 13))
node_components=(volumes socat coredns kube-proxy kubelet containerd)

ctr_() { ctr --address "$containerd_sock" -n k8s.io "$@"; }

write_node_config() {
  mkdir -p "$node_dir/cni" "$node_dir/kubelet" "$node_dir/containerd"
  cat >"$node_dir/containerd.toml" <<CONF
version = 2
root = "$node_dir/containerd/root"
state = "$node_dir/containerd/state"
[grpc]
  address = "$containerd_sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/flowtel/pause:$PAUSE_REVISION"
  # Without it every sandbox fails ("can't get final child's PID from pipe"): no CAP_SYS_RESOURCE here.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$node_dir/cni"
CONF
  cat >"$node_dir/cni/10-flowtel.conflist" <<CONF
{
  "cniVersion": "0.4.0",
  "name": "flowtel",
  "plugins": [
    {"type": "bridge", "bridge": "$node_bridge", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$node_cidr", "gateway": "$node_gateway"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$node_dir/cni-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
CONF
  cat >"$node_dir/kubelet.yaml" <<CONF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
# This machine's cgroup hierarchy is hybrid v1.
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://$containerd_sock
address: $node_gateway
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz_port
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: AlwaysAllow}
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
clusterDNS: [$node_gateway]
clusterDomain: cluster.local
podCIDR: $node_cidr
enforceNodeAllocatable: []
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
# No registry: images are loaded, never pulled, so never collected either.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
CONF
  cat >"$node_dir/kube-proxy.yaml" <<CONF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clusterCIDR: $node_cidr
hostnameOverride: $node_name
bindAddress: 127.0.0.1
metricsBindAddress: 127.0.0.1:$proxy_metrics_port
healthzBindAddress: 127.0.0.1:$proxy_healthz_port
clientConnection: {kubeconfig: $kubeconfig}
# Leave the host's conntrack table size alone.
conntrack: {maxPerCore: 0}
CONF
  cat >"$node_dir/Corefile" <<CONF
cluster.local:53 in-addr.arpa:53 {
  bind $node_gateway
  errors
  cache 5
  kubernetes cluster.local in-addr.arpa {
    kubeconfig $kubeconfig flowtel-local
    pods insecure
  }
}
.:53 {
  bind $node_gateway
  errors
  forward . /etc/resolv.conf
}
CONF
}

node_ready() {
  [ "$(kubectl_ get node "$node_name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

# The apiserver listens on loopback only; pods reach it as the `kubernetes` Service, whose endpoint is the bridge's
# address, where socat forwards to loopback (a DNAT would not do: kube-proxy's DNAT of the Service ends the chain).
apiserver_for_pods() {
  start socat "TCP-LISTEN:$apiserver_port,bind=$node_gateway,reuseaddr,fork" "TCP:127.0.0.1:$apiserver_port"
  kubectl_ apply -f - >/dev/null <<CONF
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes-real-node
  namespace: default
  labels: {kubernetes.io/service-name: kubernetes, endpointslice.kubernetes.io/managed-by: flowtel-e2e-cluster}
addressType: IPv4
endpoints: [{addresses: [$node_gateway], conditions: {ready: true}}]
ports: [{name: https, port: $apiserver_port, protocol: TCP}]
CONF
}

load_images() {
  local archive
  "$here/images" build all
  while read -r archive; do
    ctr_ images import "$archive" >/dev/null
  done < <("$here/images" save)
}

cmd_node_up() {
  [ "$(id -u)" = 0 ] || die "the real node needs root (containerd, CNI, iptables)"
  { [ -f "$state/versions" ] && readyz; } || die "the cluster is not up: e2e/cluster up first"
  if node_ready && pid_alive kubelet && pid_alive containerd; then
    # Up already: the images are brought up to date (rebuilt from the current binaries, imported again).
    load_images
    log "the real node is up; images loaded"
    return 0
  fi
  "$here/build-binaries" node
  if ! { command -v containerd && command -v runc && command -v socat && [ -x /usr/lib/cni/bridge ]; } >/dev/null; then
    log "installing containerd, runc, socat and the CNI plugins from the Debian archive"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq containerd runc socat \
      containernetworking-plugins >/dev/null || die "apt-get install containerd runc socat containernetworking-plugins failed"
  fi
  cmd_node_down quiet
  local t0=$SECONDS
  write_node_config
  # The bridge exists before the first pod, so that DNS and the apiserver's forward can use its address.
  ip link add "$node_bridge" type bridge
  ip addr add "$node_gateway/24" dev "$node_bridge"
  ip link set "$node_bridge" up
  start containerd --config "$node_dir/containerd.toml"
  wait_for 30 "containerd" ctr_ version
  load_images
  start kubelet --config="$node_dir/kubelet.yaml" --kubeconfig="$kubeconfig" --hostname-override="$node_name" \
    --node-ip="$node_gateway" --root-dir="$node_dir/kubelet" --node-labels=flowtel.dev/real-node=true,type=real
  start kube-proxy --config="$node_dir/kube-proxy.yaml"
  apiserver_for_pods
  start coredns -conf "$node_dir/Corefile"
  # The volume provisioner (e2e/src/bin/volumes.rs): claims of pods on this node get real directories.
  if [ -z "${FLOWTEL_VOLUMES_BIN:-}" ]; then
    cargo build --locked -q --manifest-path "$here/../Cargo.toml" -p flowtel-e2e --bin volumes
  fi
  start volumes
  wait_for 60 "the real node Ready" node_ready
  log "the real node $node_name is up in $((SECONDS - t0)) s (pods in $node_cidr, DNS at $node_gateway)"
}

cmd_node_down() {
  local c ids
  # Containers first, so that none outlives its runtime (their shims would keep running).
  if pid_alive containerd; then
    stop_component kubelet
    ids=$(ctr_ tasks ls -q 2>/dev/null || true)
    for c in $ids; do ctr_ tasks kill -s KILL "$c" >/dev/null 2>&1 || true; done
    for c in $ids; do ctr_ tasks delete -f "$c" >/dev/null 2>&1 || true; done
  fi
  for c in "${node_components[@]}"; do stop_component "$c"; done
  pkill -KILL -f "containerd-shim-runc-v2 .*-address $containerd_sock" 2>/dev/null || true
  if [ -x "$(binary kube-proxy)" ]; then "$(binary kube-proxy)" --cleanup >/dev/null 2>&1 || true; fi
  # A bridge left behind keeps its route, and Services then answer nothing.
  ip link del "$node_bridge" 2>/dev/null || true
  if [ -d "$node_dir" ]; then
    awk -v d="$node_dir" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r |
      while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$node_dir"
  fi
  if readyz; then kubectl_ delete node "$node_name" --ignore-not-found --wait=false >/dev/null 2>&1 || true; fi
  [ "${1:-}" = quiet ] || log "the real node is down"
}

cmd_node_status() {
  local c
  for c in "${node_components[@]}"; do
    if pid_alive "$c"; then echo "$c: running (pid $(cat "$pids/$c"))"; else echo "$c: stopped"; fi
  done
  if node_ready; then echo "node $node_name: Ready"; else echo "node $node_name: not ready"; fi
}
