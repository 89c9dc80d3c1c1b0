//! Every benchmark scenario runs end to end on a tiny load and reports
//! figures that hang together (so the documented runs cannot rot). These are
//! not speed tests: no figure is compared with a time budget.
#![allow(clippy::unwrap_used)]

use bridgekeys_bench::{http, manager, megolm, olm, scale, storage, synapse, upgrade};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_and_http_scenarios_serve_every_claim_and_report_consistent_figures() {
    let dir = tempfile::tempdir().unwrap();
    let m = manager::run(&manager::ManagerBench {
        devices: 50,
        concurrency: 8,
        claims: 300,
        raw_seconds: 0.05,
        dir: dir.path().to_owned(),
    })
    .await
    .unwrap();
    assert_eq!((m.devices, m.claims), (50, 300));
    assert!(m.raw_keys_per_s_all > 0.0 && m.manager_claims_per_s > 0.0);
    assert!(m.manager_p50_ms <= m.manager_p99_ms);
    assert!(
        (m.ratio_to_raw - m.manager_claims_per_s / m.raw_keys_per_s_all).abs() < 1e-9,
        "the ratio is the two figures divided"
    );

    let h = http::run(&http::HttpBench {
        devices: 50,
        connections: 8,
        claims: 300,
        raw_seconds: 0.05,
        dir: dir.path().to_owned(),
    })
    .await
    .unwrap();
    assert_eq!(h.claims, 300, "every claim answered with one key");
    assert!(h.http_claims_per_s > 0.0 && h.http_floor_per_s > 0.0);
    assert!(h.http_p50_ms <= h.http_p99_ms);
    assert!(h.ratio_bound_without_store > 0.0 && h.ratio_bound_without_store < 1.0);
    // Every claim was made durable by some flush, and no flush answered
    // more claims than there were connections waiting.
    assert!(
        h.claims_per_flush >= 1.0 && h.claims_per_flush <= 8.0,
        "claims per flush {}",
        h.claims_per_flush
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn olm_scenario_decrypts_every_message_durably_and_fans_out_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let r = olm::run(&olm::OlmBench {
        devices: 20,
        messages: 5,
        concurrency: 8,
        recipients: 10,
        fanout_rounds: 1,
        slices: 2,
        dir: dir.path().to_owned(),
    })
    .await
    .unwrap();
    // Every message was decrypted (and checked) both ways.
    assert_eq!((r.decrypts, r.raw_decrypts, r.slices), (100, 100, 2));
    assert!(r.decrypts_per_s > 0.0 && r.raw_decrypts_per_s > 0.0);
    assert!(r.p50_ms <= r.p99_ms);
    assert!((r.ratio_to_raw - r.decrypts_per_s / r.raw_decrypts_per_s).abs() < 1e-9);
    assert_eq!(r.goal_met, r.ratio_to_raw >= r.goal_ratio);
    assert!(r.decrypts_per_flush >= 1.0);
    assert!(r.session_record_bytes > 100.0, "{}", r.session_record_bytes);
    let f = &r.fanout;
    assert_eq!(f.recipients, 10);
    // One awaited call after the other: one fsync per session created and
    // per message encrypted.
    assert_eq!((f.claimed_flushes, f.reused_flushes), (20.0, 10.0));
    assert!(f.claimed_flushes_concurrent <= 20.0 && f.reused_flushes_concurrent <= 10.0);
    assert!((f.claimed_to_reused - f.claimed_ms / f.reused_ms).abs() < 1e-9);
    assert!(f.claimed_ms > 0.0 && f.reused_ms_concurrent > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megolm_scenario_decrypts_every_event_through_transactions_and_rotates_for_every_device() {
    let dir = tempfile::tempdir().unwrap();
    let r = megolm::run(&megolm::MegolmBench {
        events: 60,
        shapes: vec!["1x1".parse().unwrap(), "10x2".parse().unwrap()],
        session_messages: 6,
        concurrency: 4,
        slices: 2,
        recipients: 5,
        rounds: 1,
        dir: dir.path().to_owned(),
    })
    .await
    .unwrap();
    // Ten rooms per load, three loads, each key delivered over Olm.
    assert_eq!((r.room_keys, r.slices), (30, 2));
    let [one, ten] = &r.transactions[..] else {
        panic!("{:?}", r.transactions)
    };
    // Every event decrypted (checked by the handler) in as many transactions.
    assert_eq!((one.events, one.transactions), (60, 60));
    assert_eq!((ten.events, ten.transactions), (60, 6));
    for t in &r.transactions {
        assert!(t.events_per_s > 0.0 && t.raw_decrypts_per_s > 0.0);
        assert!((t.ratio_to_raw - t.events_per_s / t.raw_decrypts_per_s).abs() < 1e-9);
        // Each answer waits for a flush; transactions in flight together
        // may share one (group commit).
        assert!(
            t.fsyncs_per_txn * t.in_flight as f64 >= 0.9,
            "each answer waits for a flush: {} per txn with {} in flight",
            t.fsyncs_per_txn,
            t.in_flight
        );
        assert!(t.txn_p50_ms <= t.txn_p99_ms);
    }
    assert_eq!(r.headline_shape, "1x1", "the fewest in flight");
    assert_eq!(r.goal_met, r.ratio_to_raw >= r.goal_ratio);
    assert_eq!(r.store_level.events, 60);
    assert!(r.store_level.decrypts_per_s > 0.0 && r.raw_from_pickle_us_per_decrypt > 0.0);
    let o = &r.outbound;
    // One m.room_key per device per rotation, Olm sessions made once.
    assert_eq!(o.to_device_per_rotation, 5.0);
    assert_eq!(o.olm_sessions_per_claimed_rotation, 5.0);
    assert_eq!(o.steady_messages, 5);
    // Durable: at least one flush for the sessions created and one for the
    // keys sent (each group shares its flushes), and one each for the new
    // session, the record and the first message.
    assert!(o.fsyncs_per_claimed_rotation >= 5.0, "{o:?}");
    assert!(o.fsyncs_per_reused_rotation >= 4.0, "{o:?}");
    assert!(o.rotation_claimed_ms > 0.0 && o.rotation_reused_ms > 0.0 && o.encrypt_ms > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_loads_cold_devices_and_storage_measures_real_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = scale::run(&scale::ScaleBench {
        sizes: vec![100, 2_000],
        claims: 400,
        concurrency: 8,
        dir: dir.path().to_owned(),
    })
    .await
    .unwrap();
    assert_eq!(s.points.len(), 2);
    assert_eq!(s.points[1].claims, 400);
    // Every device starts cold after the reopen: with 2 000 devices most of
    // the 400 claims must load theirs; with 100, at most 100 loads.
    assert!(s.points[0].cold_loads <= 100);
    assert!(s.points[1].cold_loads > 300, "{:?}", s.points[1]);
    assert!((s.scale_ratio - s.points[1].p99_ms / s.points[0].p99_ms).abs() < 1e-9);
    assert_eq!(s.p99_ms_1k, None, "no 1 000-device point was measured");

    let st = storage::run(&storage::StorageBench {
        devices: 500,
        dir: dir.path().to_owned(),
        pool_size: 10,
    })
    .await
    .unwrap();
    assert!(st.store_bytes > st.empty_store_bytes);
    // An idle device holds at least its sealed account (two 32-byte secrets,
    // a fallback key, nonce and tag) and its registry key.
    assert!(st.bytes_per_device > 150.0, "{}", st.bytes_per_device);
    let a = &st.alternative;
    assert_eq!(a.keys_per_device, 50);
    assert!(a.key_json_bytes > 150, "a signed key with its signature");
    assert_eq!(
        a.total_bytes_per_device,
        st.bytes_per_device.round() as usize + a.extra_bytes_per_device
    );
    // A pool of 10 keys: its records on the bridge (each at least a 32-byte
    // secret and its public key) and 10 rows on the homeserver, less than
    // the 50 of the alternative.
    let p = &st.pool;
    assert_eq!(p.keys_per_device, 10);
    assert!(p.bridge_bytes > 10.0 * 64.0, "{}", p.bridge_bytes);
    assert_eq!(
        p.homeserver_bytes,
        10 * (a.homeserver_row_bytes + a.homeserver_index_bytes)
    );
    assert!(p.total_bytes_per_device < a.total_bytes_per_device as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synapse_scenario_claims_local_and_proxied_keys_through_a_real_synapse() {
    let dir = tempfile::tempdir().unwrap();
    let r = synapse::run(&synapse::SynapseBench {
        local_devices: 3,
        keys_per_device: 10,
        puppets: 3,
        connections: 4,
        claims: 20,
        serial_claims: 5,
        dir: dir.path().to_owned(),
    })
    .await
    .unwrap();
    assert_eq!(r.failures(), 0, "every claim returned one valid key");
    assert!(r.synapse_local_claims_per_s > 0.0 && r.synapse_proxied_claims_per_s > 0.0);
    assert!(r.appservice_share > 0.0 && r.appservice_share < 1.0);
}

#[test]
fn upgrade_scenario_converts_a_schema_3_store_and_reports_both_opens() {
    let dir = tempfile::tempdir().unwrap();
    let r = upgrade::run(&upgrade::UpgradeBench {
        devices: 40,
        keys_per_device: 3,
        dir: dir.path().to_owned(),
    })
    .unwrap();
    assert_eq!((r.devices, r.one_time_keys), (40, 120));
    assert!(r.write_s > 0.0 && r.upgrade_open_s > 0.0 && r.plain_open_s > 0.0);
    assert!(
        (r.devices_per_s - 40.0 / r.upgrade_open_s).abs() < 1e-6,
        "devices/s is the devices over the upgrading open"
    );
    assert!(r.bytes_before > 0 && r.bytes_after > 0);
}
