//! Headless Chromium driven over the WebDriver protocol: a `chromedriver` child of its own
//! per test, spoken to with plain HTTP (no client crate). `scripts/services.sh` installs
//! Debian's `chromium` and `chromium-driver`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use super::{eventually, free_port, http_request};

/// The WebDriver key of an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A browser session; the driver is killed when dropped.
pub struct Browser {
    /// The `chromedriver` process.
    driver: Child,
    /// Where it listens.
    addr: SocketAddr,
    /// The session's path prefix, `/session/<id>`.
    session: String,
}

impl Browser {
    /// Starts `chromedriver` and a headless Chromium session.
    pub async fn start() -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("chromedriver could not start ({e}): run scripts/services.sh, which installs chromium and chromium-driver")
            });
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut browser = Browser {
            driver,
            addr,
            session: String::new(),
        };
        eventually(
            "chromedriver to answer",
            Duration::from_secs(20),
            || async { http_request(addr, "GET", "/status", &[], "").await.0 == 200 },
        )
        .await;
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
        ];
        let options = json!({"binary": "/usr/bin/chromium", "args": args});
        let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": options}}});
        let session = browser.call("POST", "/session", caps).await;
        let id = session["sessionId"].as_str().expect("a session id");
        browser.session = format!("/session/{id}");
        browser
    }

    /// One WebDriver command; its `value`. Panics on an error answer.
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let json = [("Content-Type", "application/json")];
        let body = if method == "GET" {
            String::new()
        } else {
            body.to_string()
        };
        let (code, answer) = http_request(self.addr, method, path, &json, &body).await;
        let answer: Value = serde_json::from_str(&answer).unwrap_or(Value::Null);
        assert_eq!(code, 200, "WebDriver {method} {path}: {answer}");
        answer["value"].clone()
    }

    /// A command on this session.
    async fn command(&self, method: &str, path: &str, body: Value) -> Value {
        self.call(method, &format!("{}{path}", self.session), body)
            .await
    }

    /// Opens `url`.
    pub async fn goto(&self, url: &str) {
        self.command("POST", "/url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body; `return` its result) in the page.
    pub async fn eval(&self, script: &str) -> Value {
        let body = json!({"script": script, "args": []});
        self.command("POST", "/execute/sync", body).await
    }

    /// The first element matching the CSS `selector`.
    async fn find(&self, selector: &str) -> String {
        let body = json!({"using": "css selector", "value": selector});
        let found = self.command("POST", "/element", body).await;
        found[ELEMENT].as_str().expect("an element").to_owned()
    }

    /// Clicks the element matching `selector`, as a user would.
    pub async fn click(&self, selector: &str) {
        let element = self.find(selector).await;
        let path = format!("/element/{element}/click");
        self.command("POST", &path, json!({})).await;
    }

    /// Types `text` into the element matching `selector`.
    pub async fn type_into(&self, selector: &str, text: &str) {
        let element = self.find(selector).await;
        let path = format!("/element/{element}/value");
        self.command("POST", &path, json!({ "text": text })).await;
    }

    /// The text of the element matching `selector` (`null` if there is none).
    pub async fn text(&self, selector: &str) -> Value {
        let selector = serde_json::to_string(selector).unwrap();
        self.eval(&format!(
            "const e = document.querySelector({selector}); return e && e.textContent;"
        ))
        .await
    }
}

impl Drop for Browser {
    /// Ends the session (which closes Chromium), then stops the driver.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        if let Ok(mut s) = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
        {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let request = format!("DELETE {} HTTP/1.0\r\nHost: x\r\n\r\n", self.session);
            let _ = s.write_all(request.as_bytes());
            let _ = s.read_to_end(&mut Vec::new());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
