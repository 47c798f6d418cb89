//! Who may ask the dispatcher for a pool's runs: a worker presents its pod's ServiceAccount token, the apiserver says
//! whose it is (TokenReview, remembered for a minute per token), and only the pool's own ServiceAccount, in the
//! pool's namespace, is served. A pod elsewhere, or of another identity, never sees a run's arguments or
//! environment and cannot report a run's end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flowtel_crds::WorkerPool;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};

/// How long an answered review stands (a token is valid for an hour or more; a revoked one is refused within this).
const REMEMBERED: Duration = Duration::from_secs(60);

/// Why a request was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Refused {
    #[error("no bearer token (the worker's ServiceAccount token is required)")]
    NoToken,
    #[error("the token was not accepted by the apiserver")]
    NotAuthenticated,
    #[error("{user} may not serve WorkerPool {pool}: only its ServiceAccount {expected} may")]
    NotThePoolsIdentity { user: String, pool: String, expected: String },
    #[error("WorkerPool {0} does not exist")]
    NoSuchPool(String),
    #[error("the token could not be reviewed: {0}")]
    Review(String),
}

/// Checks workers' tokens.
#[derive(Clone)]
pub struct Authenticator {
    client: kube::Client,
    pools: Arc<Mutex<Option<Store<WorkerPool>>>>,
    reviewed: Arc<Mutex<HashMap<String, Reviewed>>>,
}

/// A token's user (None: not authenticated), and when the apiserver said so.
type Reviewed = (Option<String>, Instant);

impl Authenticator {
    pub fn new(client: kube::Client) -> Self {
        Self { client, pools: Arc::default(), reviewed: Arc::default() }
    }

    /// The pools' cache (the pool controller's), read for each pool's ServiceAccount.
    pub fn read_pools_from(&self, pools: Store<WorkerPool>) {
        *self.pools.lock().unwrap_or_else(|e| e.into_inner()) = Some(pools);
    }

    /// Whether `token` may serve `pool` (`<namespace>/<name>`).
    pub async fn authorize(&self, token: Option<&str>, pool: &str) -> Result<(), Refused> {
        let token = token.ok_or(Refused::NoToken)?;
        let user = self.user_of(token).await?.ok_or(Refused::NotAuthenticated)?;
        let (namespace, name) = pool.split_once('/').unwrap_or(("", pool));
        let store = self.pools.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let found = store.and_then(|s| s.get(&ObjectRef::new(name).within(namespace)));
        let found = found.ok_or_else(|| Refused::NoSuchPool(pool.to_string()))?;
        let account = found
            .spec
            .template
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let expected = format!("system:serviceaccount:{namespace}:{account}");
        if user == expected { Ok(()) } else { Err(Refused::NotThePoolsIdentity { user, pool: pool.into(), expected }) }
    }

    async fn user_of(&self, token: &str) -> Result<Option<String>, Refused> {
        if let Some((user, at)) = self.reviewed.lock().unwrap_or_else(|e| e.into_inner()).get(token)
            && at.elapsed() < REMEMBERED
        {
            return Ok(user.clone());
        }
        let review =
            TokenReview { spec: TokenReviewSpec { token: token.to_string(), audiences: None }, ..Default::default() };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api.create(&PostParams::default(), &review).await.map_err(|e| Refused::Review(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        let user = status.authenticated.unwrap_or(false).then(|| status.user.and_then(|u| u.username)).flatten();
        let mut reviewed = self.reviewed.lock().unwrap_or_else(|e| e.into_inner());
        reviewed.retain(|_, (_, at)| at.elapsed() < REMEMBERED);
        reviewed.insert(token.to_string(), (user.clone(), Instant::now()));
        Ok(user)
    }
}
