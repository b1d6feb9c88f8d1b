//! Every HTTP request of the S3 backend through the backend's [`Limiter`]
//! ([`crate::throttle`]): an object_store `HttpConnector` wrapping its own reqwest client, so
//! that object_store's retries of throttled requests wait for their `Retry-After` and the
//! backend's lowered limit too.

use std::sync::Arc;

use async_trait::async_trait;
use object_store::ClientOptions;
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};

use crate::throttle::{Answer, Limiter};

#[derive(Debug)]
pub(super) struct ThrottledConnector {
    pub(super) limiter: Arc<Limiter>,
}

impl HttpConnector for ThrottledConnector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(Throttled {
            inner,
            limiter: self.limiter.clone(),
        }))
    }
}

#[derive(Debug)]
struct Throttled {
    inner: HttpClient,
    limiter: Arc<Limiter>,
}

#[async_trait]
impl HttpService for Throttled {
    async fn call(&self, req: HttpRequest) -> Result<HttpResponse, HttpError> {
        let permit = self.limiter.acquire().await;
        let result = self.inner.execute(req).await;
        if let Ok(resp) = &result {
            let retry_after = resp.headers().get("retry-after").map(|v| v.as_bytes());
            permit.answered(Answer::from_status(resp.status().as_u16(), retry_after));
        }
        result
    }
}
