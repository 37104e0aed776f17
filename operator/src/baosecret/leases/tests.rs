//! When leases and certificates are renewed, replaced and revoked, without a cluster or
//! OpenBao: scenarios on a simulated clock, and a property test over any timing input.

use proptest::prelude::*;

use super::*;

const T0: Secs = 1_800_000_000;

fn settings(revoke_after: Secs) -> Settings {
    Settings {
        revoke_after,
        ..Settings::default()
    }
}

fn at(l: &Option<String>) -> Option<Secs> {
    parse(l.as_deref())
}

#[test]
fn rotation_settings_have_defaults_and_bounds_naming_the_field() {
    let s = Settings::from_spec(None).unwrap();
    assert_eq!(
        (s.revoke_after, s.replace_before, s.renew_at_percent),
        (300, None, 67)
    );
    let r = |revoke: &str, replace: Option<&str>, percent: Option<u8>| Rotation {
        revoke_after: Some(revoke.into()),
        replace_before: replace.map(Into::into),
        renew_at_percent: percent,
    };
    let s = Settings::from_spec(Some(&r("4s", Some("1m"), Some(50)))).unwrap();
    assert_eq!(
        (s.revoke_after, s.replace_before, s.renew_at_percent),
        (4, Some(60), 50)
    );
    for (rotation, field) in [
        (r("0s", None, None), "spec.rotation.revokeAfter"),
        (r("25h", None, None), "spec.rotation.revokeAfter"),
        (r("5m", Some("0s"), None), "spec.rotation.replaceBefore"),
        (r("5m", None, Some(5)), "spec.rotation.renewAtPercent"),
        (r("5m", None, Some(96)), "spec.rotation.renewAtPercent"),
    ] {
        let e = Settings::from_spec(Some(&rotation)).unwrap_err();
        assert!(e.starts_with(field), "{e}");
    }
}

#[test]
fn the_default_lead_is_a_third_of_the_lease_and_at_least_the_grace_and_a_margin() {
    let s = settings(300);
    assert_eq!(s.lead(3600), 1200);
    assert_eq!(s.lead(60), 330);
    let explicit = Settings {
        replace_before: Some(10),
        ..s
    };
    assert_eq!(explicit.lead(3600), 10);
}

/// A 20 s lease with a 40 s max TTL, a 3 s grace: renewed at 2/3 until a renewal grants less
/// than asked, then replaced at once (the end is closer than the lead) while the old lease
/// has a third of its duration left for the grace.
#[test]
fn a_short_lease_is_renewed_until_its_max_ttl_shows_then_replaced_before_it() {
    let s = settings(3);
    let mut l = issued("db", "database/creds/app/a", 20, true, T0);
    schedule(&mut l, true, &s, T0);
    assert_eq!(at(&l.renew_time), Some(T0 + 13));
    assert_eq!(l.replace_time, None, "the end is not known yet");
    assert_eq!(work(&l, T0 + 12), LeaseWork::None);
    assert_eq!(work(&l, T0 + 13), LeaseWork::Renew);
    renewed(&mut l, 20, T0 + 13);
    schedule(&mut l, true, &s, T0 + 13);
    assert_eq!(l.max_expiry_time, None, "a full grant: no end in sight");
    assert_eq!(at(&l.renew_time), Some(T0 + 26));
    // The max TTL (40 s) caps the next grant.
    renewed(&mut l, 14, T0 + 26);
    schedule(&mut l, true, &s, T0 + 26);
    assert_eq!(at(&l.max_expiry_time), Some(T0 + 40));
    assert_eq!(l.renew_time, None, "nothing more to gain");
    assert_eq!(
        at(&l.replace_time),
        Some(T0 + 26),
        "40 - max(3 + 30, 20 / 3) is past"
    );
    assert_eq!(work(&l, T0 + 26), LeaseWork::Replace);
    // The old lease is revoked after the grace, well before its own end.
    let mut owed = vec![retire(&l)];
    assert_eq!(revocation_work(&owed[0], T0 + 30), RevocationWork::Wait);
    written(&mut owed, &s, T0 + 27);
    assert_eq!(at(&owed[0].revoke_time), Some(T0 + 30));
    assert_eq!(revocation_work(&owed[0], T0 + 29), RevocationWork::Wait);
    assert_eq!(revocation_work(&owed[0], T0 + 30), RevocationWork::Revoke);
    assert_eq!(revocation_work(&owed[0], T0 + 40), RevocationWork::Drop);
}

#[test]
fn a_long_lease_is_replaced_replace_before_ahead_of_its_known_end() {
    let s = Settings {
        replace_before: Some(600),
        ..settings(300)
    };
    let mut l = issued("db", "database/creds/app/a", 3600, true, T0);
    renewed(&mut l, 1800, T0 + 2400);
    schedule(&mut l, true, &s, T0 + 2400);
    assert_eq!(at(&l.replace_time), Some(T0 + 2400 + 1800 - 600));
    // A lease that cannot be renewed knows its end from the start.
    let mut fixed = issued("db", "aws/creds/x/a", 900, false, T0);
    schedule(&mut fixed, true, &settings(60), T0);
    assert_eq!(fixed.renew_time, None);
    assert_eq!(at(&fixed.replace_time), Some(T0 + 900 - 300));
}

#[test]
fn a_lease_whose_token_is_no_longer_kept_alive_ends_with_that_token() {
    let s = settings(60);
    let mut l = issued("db", "database/creds/app/a", 3600, true, T0);
    l.token_expiry_time = Some(format(T0 + 1800));
    schedule(&mut l, true, &s, T0);
    assert_eq!(l.replace_time, None, "the cache renews the token");
    // After a restart (or a new login) nobody renews that token: it ends at its expiry.
    schedule(&mut l, false, &s, T0 + 60);
    assert_eq!(at(&l.replace_time), Some(T0 + 1800 - 1200));
    assert_eq!(end(&l, false), Some(T0 + 1800));
}

#[test]
fn a_refused_renewal_or_an_ended_lease_is_replaced() {
    let s = settings(60);
    let mut l = issued("db", "database/creds/app/a", 600, true, T0);
    renewal_refused(&mut l);
    schedule(&mut l, true, &s, T0 + 400);
    assert_eq!(
        work(&l, T0 + 400),
        LeaseWork::Replace,
        "ends at 600, lead 200"
    );
    let dead = issued("db", "database/creds/app/b", 60, true, T0);
    assert_eq!(work(&dead, T0 + 60), LeaseWork::Replace);
    let mut garbage = dead.clone();
    garbage.expiry_time = "yesterday".into();
    assert_eq!(work(&garbage, T0), LeaseWork::Replace);
}

#[test]
fn a_certificate_is_renewed_at_its_share_of_the_lifetime_and_not_before() {
    assert_eq!(certificate_renewal(T0, T0 + 300, 67, T0), T0 + 201);
    assert_eq!(certificate_renewal(T0, T0 + 300, 50, T0 + 10), T0 + 150);
    assert_eq!(
        certificate_renewal(T0, T0 + 300, 50, T0 + 200),
        T0 + 200,
        "not in the past"
    );
    let c = CertificateStatus {
        source: "tls".into(),
        serial_number: "01".into(),
        not_before: format(T0),
        not_after: format(T0 + 300),
        renew_time: format(T0 + 201),
        request_hash: "h".into(),
    };
    assert!(!certificate_due(&c, T0 + 200));
    assert!(certificate_due(&c, T0 + 201));
}

#[test]
fn a_book_retires_replaced_leases_and_wakes_for_the_next_future_work_only() {
    let mut book = Book::default();
    let mut a = issued("db", "database/creds/app/a", 60, true, T0);
    schedule(&mut a, true, &settings(5), T0);
    book.set_lease("db", Some(a.clone()));
    assert!(book.revocations.is_empty() && book.holds_leases());
    assert_eq!(book.next_work(T0), Some(T0 + 40));
    let b = issued("db", "database/creds/app/b", 60, true, T0 + 30);
    book.set_lease("db", Some(b));
    assert_eq!(book.revocations.len(), 1);
    assert!(
        book.write_pending(),
        "revoked only once the new credentials are written"
    );
    assert_eq!(
        book.next_work(T0 + 40),
        Some(T0 + 60),
        "the old one's end; 40 is not after now"
    );
    book.set_lease("db", None);
    assert_eq!(book.leases.len(), 0);
    assert_eq!(book.revocations.len(), 2);
}

/// Any text a status field may hold, well-formed times around `T0` among them.
fn time_text() -> impl Strategy<Value = String> {
    prop_oneof![
        (-100_000i64..100_000).prop_map(|d| format(T0 + d)),
        Just(format(Secs::MAX)),
        Just(format(Secs::MIN)),
        "\\PC{0,24}",
    ]
}

fn lease() -> impl Strategy<Value = LeaseStatus> {
    (
        any::<bool>(),
        any::<u64>(),
        time_text(),
        proptest::option::of(time_text()),
        proptest::option::of(time_text()),
        proptest::option::of(time_text()),
    )
        .prop_map(
            |(renewable, duration, expiry, max, token, renew)| LeaseStatus {
                source: "db".into(),
                lease_id: "database/creds/app/x".into(),
                renewable,
                duration_seconds: duration,
                issue_time: format(T0),
                expiry_time: expiry,
                max_expiry_time: max,
                token_expiry_time: token,
                renew_time: renew,
                replace_time: None,
                request_hash: "h".into(),
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn no_timing_input_panics_or_schedules_in_the_past(
        mut l in lease(),
        now in (T0 - 100_000)..(T0 + 100_000),
        alive in any::<bool>(),
        granted in any::<i64>(),
        revoke_after in 1i64..86_400,
        replace_before in proptest::option::of(any::<i64>()),
        percent in 0u8..=255,
        nb in any::<i64>(),
        na in any::<i64>(),
    ) {
        let s = Settings { revoke_after, replace_before, renew_at_percent: percent };
        schedule(&mut l, alive, &s, now);
        for t in [&l.renew_time, &l.replace_time] {
            if let Some(t) = at(t) { prop_assert!(t >= now, "{t} < {now}"); }
        }
        let _ = work(&l, now);
        renewed(&mut l, granted, now);
        schedule(&mut l, alive, &s, now);
        for t in [&l.renew_time, &l.replace_time] {
            if let Some(t) = at(t) { prop_assert!(t >= now, "{t} < {now}"); }
        }
        let mut owed = vec![retire(&l)];
        written(&mut owed, &s, now);
        if let Some(t) = at(&owed[0].revoke_time) { prop_assert!(t >= now); }
        let _ = revocation_work(&owed[0], now);
        prop_assert!(certificate_renewal(nb, na, percent, now) >= now);
        if let Some(next) = next_work(&[l], &[], &owed, now) { prop_assert!(next > now); }
    }
}

#[test]
fn only_lease_ids_under_the_source_path_are_renewed_or_revoked() {
    let mut l = issued("db", "database/creds/app/abc", 60, true, T0);
    assert!(lease_id_ok(&l, "database/creds/app"));
    assert!(!lease_id_ok(&l, "database/creds/ap"));
    for bad in [
        "database/creds/app/../../sys/x",
        "database/creds/app/a?b",
        "secret/x/y",
    ] {
        l.lease_id = bad.into();
        assert!(!lease_id_ok(&l, "database/creds/app"), "{bad}");
    }
    assert_eq!(parent("database/creds/app/abc"), "database/creds/app");
}
