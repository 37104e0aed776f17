//! A real node on this machine (containerd, kubelet, kube-scheduler; the real Secrets Store CSI
//! driver): pods run on it, the driver registers with the kubelet, and once the node stops the
//! host is exactly as before. Needs root (the kubelet does).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::storage::v1::{CSIDriver, CSINode};
use kube::api::{Api, ListParams, PostParams};
use kubebao_testbed::{CSI_DRIVER_NAME, HostState, Node, NodeOptions, Testbed, wait_for};
use serde_json::json;

/// A pod's phase and IP once it is Running.
async fn wait_running(pods: &Api<Pod>, name: &str) -> Pod {
    wait_for(
        &format!("pod {name} to run"),
        Duration::from_secs(120),
        || {
            let pods = pods.clone();
            async move {
                let pod = pods.get(name).await.map_err(|e| e.to_string())?;
                let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
                if phase.as_deref() == Some("Running") {
                    Ok(pod)
                } else {
                    Err(format!("phase {phase:?}: {:?}", pod.status))
                }
            }
        },
    )
    .await
}

fn pause_pod(name: &str, image: &str, host_network: bool) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "hostNetwork": host_network,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "pause", "image": image, "imagePullPolicy": "Never"}],
        },
    })
}

fn assert_host_restored(before: &HostState, after: &HostState) {
    let differences = after.differences(before);
    assert!(
        differences.is_empty(),
        "the host changed after the node stopped:\n{}",
        differences.join("\n")
    );
    assert_eq!(before, after);
}

#[tokio::test(flavor = "multi_thread")]
async fn node_runs_pods_and_leaves_the_host_as_it_was() {
    let bed = Testbed::shared().await;
    let node = Node::start(bed).await;
    let before = node.host_before().clone();
    let during = HostState::capture();
    assert!(
        !during.differences(&before).is_empty(),
        "a running node changes the host (kubepods cgroups, its bridge, …), or this test proves nothing"
    );
    let ns = bed.namespace("node").await;
    let client = bed.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let image = node.pause_image();

    // A static pod: the kubelet runs it from its manifest directory and mirrors it.
    let mut manifest = pause_pod("static-pause", image, true);
    manifest["metadata"]["namespace"] = json!(ns);
    std::fs::write(
        node.static_pod_dir().join("static-pause.json"),
        manifest.to_string(),
    )
    .expect("write static pod manifest");
    let mirror = wait_running(&pods, &format!("static-pause-{}", node.name())).await;
    assert!(
        mirror
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("kubernetes.io/config.mirror"),
        "the static pod's API object is a mirror pod"
    );

    // A DaemonSet's pod: placed by the DaemonSet controller and kube-scheduler.
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "pause-ds"},
        "spec": {
            "selector": {"matchLabels": {"app": "pause-ds"}},
            "template": {
                "metadata": {"labels": {"app": "pause-ds"}},
                "spec": pause_pod("x", image, true)["spec"],
            },
        },
    }))
    .expect("daemonset");
    Api::<DaemonSet>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &ds)
        .await
        .expect("create DaemonSet");
    let ds_pod = wait_for(
        "the DaemonSet's pod to be created",
        Duration::from_secs(60),
        || {
            let pods = pods.clone();
            async move {
                let list = pods
                    .list(&ListParams::default().labels("app=pause-ds"))
                    .await
                    .map_err(|e| e.to_string())?;
                list.items
                    .into_iter()
                    .next()
                    .and_then(|p| p.metadata.name)
                    .ok_or_else(|| "no pod yet".to_string())
            }
        },
    )
    .await;
    let ds_pod = wait_running(&pods, &ds_pod).await;
    assert_eq!(
        ds_pod.spec.and_then(|s| s.node_name).as_deref(),
        Some(node.name())
    );

    // A pod on the pod network: its own IP on the node's bridge, reachable from the host
    // (a refused connection is the pod's own kernel answering), with IP forwarding still off.
    let pod: Pod = serde_json::from_value(pause_pod("net-pause", image, false)).expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let pod = wait_running(&pods, "net-pause").await;
    let ip: Ipv4Addr = pod
        .status
        .and_then(|s| s.pod_ip)
        .expect("pod IP")
        .parse()
        .expect("IPv4 pod IP");
    assert_eq!(
        ip.octets()[..3],
        [10, 244, 0],
        "pod IP {ip} is in the node's pod subnet {}",
        node.pod_subnet()
    );
    let reply =
        TcpStream::connect_timeout(&SocketAddr::new(IpAddr::V4(ip), 9), Duration::from_secs(3));
    assert_eq!(
        reply.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionRefused),
        "the pod's network stack answers the host"
    );
    assert_eq!(
        HostState::capture().sysctls.get("net/ipv4/ip_forward"),
        before.sysctls.get("net/ipv4/ip_forward"),
        "the pod network left IP forwarding as it was"
    );

    // The API server reaches the kubelet (logs) on loopback, by the node's Hostname address.
    bed.try_kubectl(&["logs", "-n", &ns, "net-pause"], "")
        .unwrap_or_else(|e| panic!("kubectl logs through the kubelet: {e}"));

    let after = node.stop();
    assert_host_restored(&before, &after);
}

#[tokio::test(flavor = "multi_thread")]
async fn csi_driver_registers_with_the_kubelet() {
    let bed = Testbed::shared().await;
    let node = Node::start_with(
        bed,
        NodeOptions {
            csi_driver: true,
            ..Default::default()
        },
    )
    .await;
    let before = node.host_before().clone();
    let client = bed.client().await;
    let csinode = Api::<CSINode>::all(client.clone())
        .get(node.name())
        .await
        .expect("CSINode");
    let drivers: Vec<String> = csinode.spec.drivers.into_iter().map(|d| d.name).collect();
    assert!(
        drivers.iter().any(|d| d == CSI_DRIVER_NAME),
        "CSINode lists {drivers:?}"
    );
    let csidriver = Api::<CSIDriver>::all(client)
        .get(CSI_DRIVER_NAME)
        .await
        .expect("the driver's CSIDriver object");
    assert_eq!(csidriver.spec.pod_info_on_mount, Some(true));
    let providers = node.csi_provider_dir().expect("provider dir");
    assert!(
        providers.is_dir(),
        "providers put their sockets (kubebao.sock) in {}",
        providers.display()
    );
    assert!(
        node.root_dir()
            .join("plugins/csi-secrets-store/csi.sock")
            .exists(),
        "the driver serves CSI in the kubelet's plugin directory"
    );

    let after = node.stop();
    assert_host_restored(&before, &after);
}
