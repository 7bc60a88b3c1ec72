use herald_core::Settings;
use herald_messenger_api::Application;
use serde_json::{json, Value};
use test_support::{Http, TestEnv};

pub use herald_core::testing::TEST_KEY as KEY;

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub http: Http,
    pub env: TestEnv,
    pub settings: Settings,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    replicas: Vec<tokio::sync::oneshot::Sender<()>>,
}

pub use herald_core::testing::settings_for;

pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

pub async fn spawn_app_with(extra: &[(&str, &str)]) -> TestApp {
    let env = TestEnv::new().await.expect("test servers");
    let settings = settings_for(&env, extra);
    spawn_with_settings(env, settings).await
}

async fn start(settings: &Settings) -> (String, tokio::sync::oneshot::Sender<()>) {
    let app = Application::build(settings).await.expect("build");
    let address = format!("http://127.0.0.1:{}", app.port());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    (address, tx)
}

pub async fn spawn_with_settings(env: TestEnv, settings: Settings) -> TestApp {
    let (address, stop) = start(&settings).await;
    TestApp {
        address,
        client: reqwest::Client::new(),
        http: Http::new(KEY),
        env,
        settings,
        stop: Some(stop),
        replicas: Vec::new(),
    }
}

impl TestApp {
    /// Another API replica on the same database and key prefix (stopped with this one).
    pub async fn replica(&mut self) -> TestApp {
        let (address, stop) = start(&self.settings).await;
        self.replicas.push(stop);
        TestApp {
            address,
            client: reqwest::Client::new(),
            http: Http::new(KEY),
            env: TestEnv::new().await.expect("test servers"),
            settings: self.settings.clone(),
            stop: None,
            replicas: Vec::new(),
        }
    }

    /// Another API replica on the same database and key prefix that reaches the database at
    /// `mongo_uri` (a proxy in front of it); stopped on its own, with its `cleanup`.
    pub async fn replica_through(&self, mongo_uri: &str) -> TestApp {
        let mut settings = self.settings.clone();
        settings.mongo.uri = mongo_uri.to_owned().into();
        let (address, stop) = start(&settings).await;
        TestApp {
            address,
            client: reqwest::Client::new(),
            http: Http::new(KEY),
            env: TestEnv::new().await.expect("test servers"),
            settings,
            stop: Some(stop),
            replicas: Vec::new(),
        }
    }

    /// The WebSocket URL of the event feed.
    pub fn ws_url(&self) -> String {
        format!("{}/api/messenger/ws", self.address.replacen("http://", "ws://", 1))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(KEY)
    }

    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.put(self.url(path)).bearer_auth(KEY)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(KEY)
    }

    /// GET an open route (no key), answered with text.
    pub async fn open_text(&self, path: &str) -> String {
        self.http.open_text(&self.url(path)).await
    }

    /// GET an open route (no key), answered with JSON.
    pub async fn open_json(&self, path: &str) -> Value {
        self.http.open_json(&self.url(path)).await
    }

    /// GET with the key, answered with JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        self.http.get_json(&self.url(path)).await
    }

    pub async fn create(&self, to: &str, content: &str) -> Value {
        let response = self
            .post("/api/messenger/messages")
            .json(&json!({"to": to, "content": content}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json().await.unwrap()
    }

    /// Creates `n` valid messages through the batch endpoint (in chunks of 1,000).
    pub async fn seed(&self, n: usize) -> Vec<String> {
        herald_core::testing::seed_messages(&self.http, &self.address, n).await
    }

    pub async fn claim(&self, worker: &str, limit: u32) -> Vec<Value> {
        self.claim_with(json!({"worker": worker, "limit": limit})).await
    }

    pub async fn claim_with(&self, body: Value) -> Vec<Value> {
        let response = self.post("/api/messenger/get-two").json(&body).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json::<Vec<Value>>().await.unwrap()
    }

    pub async fn commit(&self, id: &str, token: &str, message_id: &str) -> reqwest::Response {
        self.put(&format!("/api/messenger/commit/{id}"))
            .json(&json!({"claimToken": token, "webhookMessageId": message_id}))
            .send()
            .await
            .unwrap()
    }

    /// Sets message `id`'s due time to `at` by hand, behind the service's back (a skewed
    /// clock, an operator's edit).
    pub async fn set_due(&self, id: &str, at: bson::DateTime) {
        let id = bson::oid::ObjectId::parse_str(id).unwrap();
        self.env
            .db()
            .collection::<bson::Document>("messages")
            .update_one(bson::doc! {"_id": id}, bson::doc! {"$set": {"next_attempt_at": at}})
            .await
            .unwrap();
    }

    pub async fn message(&self, id: &str) -> Value {
        let response = self.get(&format!("/api/messenger/messages/{id}")).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    }

    pub async fn cleanup(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        for tx in self.replicas.drain(..) {
            let _ = tx.send(());
        }
        self.env.cleanup().await.expect("cleanup");
    }
}

/// Asserts a JSON error body with the given status and internal code.
pub async fn assert_error(response: reqwest::Response, status: u16, code: u32) -> Value {
    assert_eq!(response.status(), status, "status");
    let body: Value = response.json().await.expect("JSON error body");
    assert_eq!(body["status"], status, "{body}");
    assert_eq!(body["internalCode"], code, "{body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    body
}

impl TestApp {
    /// A claim whose answer the caller inspects itself.
    pub async fn claim_raw(&self) -> reqwest::Response {
        self.post("/api/messenger/get-two")
            .json(&json!({"worker": "w"}))
            .send()
            .await
            .unwrap()
    }
}
