//! The harness can break things on purpose: OpenBao sealed, stopped and restarted keeps its
//! data; the API server restarts on the same storage.

use kubebao_testbed::{Testbed, TestbedOptions};
use serde_json::json;

#[tokio::test]
async fn openbao_can_be_sealed_stopped_and_restarted_without_losing_data() {
    let bed = Testbed::start(TestbedOptions {
        controller_manager: false,
        openbao: true,
    })
    .await;
    let bao = bed.openbao();
    let client = bao.client();
    bao.enable_engine("kv", "kv", Some(2)).await;
    let data = json!({"k": "v"}).as_object().unwrap().clone();
    client
        .kv2_write(bao.root_token(), "kv", "x", &data)
        .await
        .expect("write");

    bao.seal().await;
    let sealed = client
        .kv2_read(bao.root_token(), "kv", "x", None)
        .await
        .expect_err("sealed");
    assert_eq!(sealed.kind(), "sealed", "{sealed}");
    bao.unseal().await;

    bao.stop().await;
    let down = client
        .kv2_read(bao.root_token(), "kv", "x", None)
        .await
        .expect_err("down");
    assert_eq!(down.kind(), "unreachable", "{down}");

    bao.restart().await;
    let mark = bao.audit().len();
    let read = client
        .kv2_read(bao.root_token(), "kv", "x", None)
        .await
        .expect("read after restart");
    assert_eq!(read.data["k"], "v");
    assert_eq!(
        bao.audit().since(mark).count("kv/data/x", "read"),
        1,
        "the restarted server still audits every request"
    );
}

#[tokio::test]
async fn apiserver_restarts_on_the_same_storage() {
    let bed = Testbed::start(TestbedOptions {
        controller_manager: false,
        openbao: false,
    })
    .await;
    bed.kubectl(&[
        "create",
        "configmap",
        "survivor",
        "-n",
        "default",
        "--from-literal=a=b",
    ]);
    bed.restart_apiserver(None).await;
    let out = bed.kubectl(&[
        "get",
        "configmap",
        "survivor",
        "-n",
        "default",
        "-o",
        "jsonpath={.data.a}",
    ]);
    assert_eq!(out, "b");
}
