use std::convert::Infallible;
use std::sync::atomic::{AtomicU32, Ordering};

use futures::future::join_all;

use super::*;
use crate::fake::{Fake, Shared, start};

fn k8s() -> Credentials {
    Credentials::Kubernetes {
        mount: "kubernetes".into(),
        role: "app".into(),
        jwt: SecretString::new("jwt"),
    }
}

async fn creds() -> Result<Credentials, Infallible> {
    Ok(k8s())
}

fn fake(ttl: u64, renewable: bool) -> Fake {
    Fake {
        ttl,
        renewable,
        ..Default::default()
    }
}

fn counts(shared: &Shared) -> (u32, u32, u32) {
    let f = shared.lock().unwrap();
    (f.logins, f.renewals, f.lookups)
}

async fn token(cache: &TokenCache<&'static str>, client: &OpenBao) -> Token {
    cache.token(&"app", client, creds).await.unwrap()
}

#[tokio::test]
async fn concurrent_callers_for_one_identity_share_one_login() {
    let (shared, client) = start(Fake {
        login_delay: Duration::from_millis(100),
        ..fake(60, true)
    })
    .await;
    let cache = TokenCache::new(TokenOptions::default());
    let tokens = join_all((0..20).map(|_| cache.token(&"app", &client, creds))).await;
    let tokens: Vec<Token> = tokens.into_iter().map(Result::unwrap).collect();
    assert_eq!(counts(&shared).0, 1, "one login for 20 callers");
    assert!(tokens.iter().all(|t| t.secret.expose() == "t1"));
    assert_eq!(tokens.iter().filter(|t| !t.cached).count(), 1);
}

#[tokio::test]
async fn a_token_is_renewed_past_two_thirds_of_its_ttl() {
    let (shared, client) = start(fake(3, true)).await;
    let cache = TokenCache::new(TokenOptions::default());
    assert!(!token(&cache, &client).await.cached);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(token(&cache, &client).await.cached);
    assert_eq!(counts(&shared), (1, 0, 0), "before 2/3: used as is");
    tokio::time::sleep(Duration::from_millis(1900)).await;
    let renewed = token(&cache, &client).await;
    assert_eq!(renewed.secret.expose(), "t1");
    assert!(renewed.cached);
    assert_eq!(counts(&shared), (1, 1, 0), "past 2/3: renewed, no login");
}

#[tokio::test]
async fn a_refused_renewal_is_followed_by_a_login() {
    let (shared, client) = start(Fake {
        refuse_renewal: true,
        ..fake(3, true)
    })
    .await;
    let cache = TokenCache::new(TokenOptions::default());
    token(&cache, &client).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let next = token(&cache, &client).await;
    assert_eq!((next.secret.expose(), next.cached), ("t2", false));
    assert_eq!(counts(&shared), (2, 1, 0));
}

#[tokio::test]
async fn a_renewal_granting_much_less_than_asked_is_followed_by_a_login() {
    // Renew after 10% of 6 s; 5 s granted is less than the 90% asked for: max TTL near.
    let (shared, client) = start(Fake {
        renew_cap: Some(5),
        ..fake(6, true)
    })
    .await;
    let cache = TokenCache::new(TokenOptions {
        renew_fraction: 0.1,
        ..Default::default()
    });
    token(&cache, &client).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let next = token(&cache, &client).await;
    assert_eq!((next.secret.expose(), next.cached), ("t2", false));
    assert_eq!(counts(&shared), (2, 1, 0));
}

#[tokio::test]
async fn a_token_that_cannot_be_renewed_is_replaced_by_a_login() {
    let (shared, client) = start(fake(3, false)).await;
    let cache = TokenCache::new(TokenOptions::default());
    token(&cache, &client).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(token(&cache, &client).await.secret.expose(), "t2");
    assert_eq!(counts(&shared), (2, 0, 0));
}

#[tokio::test]
async fn a_403_on_a_dead_token_leads_to_one_login() {
    let (shared, client) = start(fake(60, true)).await;
    let cache = TokenCache::new(TokenOptions::default());
    let first = token(&cache, &client).await.secret;
    shared.lock().unwrap().live.clear(); // revoked behind our back
    let retries = join_all((0..5).map(|_| cache.denied(&"app", &client, &first, creds))).await;
    for r in retries {
        assert_eq!(r.unwrap().expect("retry").secret.expose(), "t2");
    }
    assert_eq!(counts(&shared), (2, 0, 1), "one lookup, one new login");
    assert_eq!(token(&cache, &client).await.secret.expose(), "t2");
}

#[tokio::test]
async fn a_403_on_a_live_token_is_a_policy_denial_checked_once_per_window() {
    let (shared, client) = start(fake(60, true)).await;
    let cache = TokenCache::new(TokenOptions::default());
    let t = token(&cache, &client).await.secret;
    for _ in 0..5 {
        let retry = cache.denied(&"app", &client, &t, creds).await.unwrap();
        assert!(retry.is_none(), "a live token: no retry");
    }
    assert_eq!(counts(&shared), (1, 0, 1), "no login, one lookup-self");

    // Past the window, the next 403 is checked again.
    let cache = TokenCache::new(TokenOptions {
        denied_recheck: Duration::from_millis(100),
        ..Default::default()
    });
    let t = token(&cache, &client).await.secret;
    assert!(
        cache
            .denied(&"app", &client, &t, creds)
            .await
            .unwrap()
            .is_none()
    );
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(
        cache
            .denied(&"app", &client, &t, creds)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(counts(&shared), (2, 0, 3));
}

#[tokio::test]
async fn forgetting_revokes_a_logged_in_token_but_never_a_users_token() {
    let (shared, client) = start(fake(60, true)).await;
    let cache = TokenCache::new(TokenOptions::default());
    let logged_in = token(&cache, &client).await.secret;
    shared.lock().unwrap().live.insert("user-token".into());
    let user = cache
        .token(&"user", &client, || async {
            Ok::<_, Infallible>(Credentials::Token(SecretString::new("user-token")))
        })
        .await
        .unwrap();
    assert_eq!(user.secret.expose(), "user-token");
    cache.forget(&"app").await;
    cache.forget(&"user").await;
    assert_eq!(
        shared.lock().unwrap().revoked,
        vec![logged_in.expose().to_string()]
    );
    assert!(cache.is_empty());
}

#[tokio::test]
async fn a_failed_login_is_remembered_for_the_backoff() {
    let (shared, client) = start(Fake {
        login_status: Some(500),
        ..fake(60, true)
    })
    .await;
    let cache = TokenCache::new(TokenOptions {
        login_backoff: Duration::from_millis(200),
        ..Default::default()
    });
    for _ in 0..5 {
        let err = cache.token(&"app", &client, creds).await.unwrap_err();
        assert!(matches!(
            err,
            TokenError::Login(Error::Server { status: 500, .. })
        ));
    }
    assert_eq!(counts(&shared).0, 1, "one login attempt within the backoff");
    tokio::time::sleep(Duration::from_millis(250)).await;
    shared.lock().unwrap().login_status = None;
    assert_eq!(token(&cache, &client).await.secret.expose(), "t1");
    assert_eq!(counts(&shared).0, 2);
}

#[tokio::test]
async fn credential_errors_come_back_as_the_callers_own() {
    let (shared, client) = start(fake(60, true)).await;
    let cache: TokenCache<&str> = TokenCache::new(TokenOptions::default());
    let err = cache
        .token(&"app", &client, || async {
            Err::<Credentials, _>("no ServiceAccount")
        })
        .await
        .unwrap_err();
    assert!(matches!(err, TokenError::Credentials("no ServiceAccount")));
    assert_eq!(counts(&shared).0, 0, "no login without credentials");
}

#[tokio::test]
async fn the_size_cap_forgets_dead_entries_first_then_the_least_recently_used() {
    let (shared, client) = start(fake(60, true)).await;
    let cache = TokenCache::new(TokenOptions {
        max_entries: 2,
        ..Default::default()
    });
    cache.token(&"a", &client, creds).await.unwrap();
    cache.token(&"b", &client, creds).await.unwrap();
    cache.token(&"a", &client, creds).await.unwrap(); // b is now the least recently used
    cache.token(&"c", &client, creds).await.unwrap();
    assert_eq!(cache.len(), 2);
    for _ in 0..50 {
        if !shared.lock().unwrap().revoked.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        shared.lock().unwrap().revoked,
        vec!["t2".to_string()],
        "b's token"
    );
    // A failed identity holds nothing: it goes first, and nothing is revoked for it.
    shared.lock().unwrap().login_status = Some(400);
    let cache = TokenCache::new(TokenOptions {
        max_entries: 2,
        login_backoff: Duration::ZERO,
        ..Default::default()
    });
    cache.token(&"a", &client, creds).await.unwrap_err();
    shared.lock().unwrap().login_status = None;
    cache.token(&"b", &client, creds).await.unwrap();
    cache.token(&"c", &client, creds).await.unwrap();
    assert_eq!(cache.len(), 2);
    assert_eq!(shared.lock().unwrap().revoked.len(), 1);
}

#[tokio::test]
async fn the_observer_sees_hits_misses_and_logins() {
    let (_shared, client) = start(fake(60, true)).await;
    let hits = Arc::new(AtomicU32::new(0));
    let logins = Arc::new(AtomicU32::new(0));
    let (h, l) = (hits.clone(), logins.clone());
    let cache = TokenCache::new(TokenOptions::default()).with_observer(move |e| match e {
        TokenEvent::Hit => {
            h.fetch_add(1, Ordering::Relaxed);
        }
        TokenEvent::LoggedIn => {
            l.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    });
    for _ in 0..3 {
        token(&cache, &client).await;
    }
    assert_eq!(hits.load(Ordering::Relaxed), 2);
    assert_eq!(logins.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn debug_output_never_shows_a_token() {
    let (_shared, client) = start(fake(60, true)).await;
    let cache = TokenCache::new(TokenOptions::default());
    let t = token(&cache, &client).await;
    let slot = cache.slot(&"app", &client);
    for text in [format!("{cache:?}"), format!("{t:?}"), format!("{slot:?}")] {
        assert!(!text.contains("t1"), "{text}");
    }
}

#[tokio::test]
async fn remaining_follows_the_held_token_and_ends_when_it_is_replaced() {
    let (_shared, client) = start(Fake {
        refuse_renewal: true,
        ..fake(3, true)
    })
    .await;
    let cache = TokenCache::new(TokenOptions::default());
    assert_eq!(cache.upkeep_in(&"app"), None, "no entry yet");
    let first = token(&cache, &client).await.secret;
    let left = cache.remaining(&"app", &first).expect("held");
    assert!(
        left <= Duration::from_secs(3) && left > Duration::from_secs(2),
        "{left:?}"
    );
    let due = cache.upkeep_in(&"app").expect("expires");
    assert!(due <= Duration::from_secs(2), "{due:?}");
    assert_eq!(cache.remaining(&"app", &SecretString::new("other")), None);
    // Past 2/3 the renewal is refused and a login replaces the token: the first one is no
    // longer kept alive by the cache.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let second = token(&cache, &client).await.secret;
    assert_ne!(first, second);
    assert_eq!(cache.remaining(&"app", &first), None);
    assert!(cache.remaining(&"app", &second).is_some());
}
