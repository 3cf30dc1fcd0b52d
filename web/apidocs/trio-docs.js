// Swagger UI over /openapi.json, set up from this file because the page's Content-Security-Policy allows
// no inline script. Try-it requests carry the bearer token: "Authorize" takes it, or open
// /docs#token=TOKEN (the fragment is never sent to the server; it is read here and removed from the
// address bar). A page signed in to the dashboard also works through its cookie.
"use strict";
(function () {
  const match = /(?:^#|&)token=([^&]*)/.exec(window.location.hash);
  const token = match ? decodeURIComponent(match[1]) : null;
  if (match) {
    history.replaceState(null, "", window.location.pathname + window.location.search);
  }
  const ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    // No request to swagger.io's online validator (a remote origin; the CSP would refuse it anyway).
    validatorUrl: null,
    // The token stays in this page's memory only: not in localStorage.
    persistAuthorization: false,
    tryItOutEnabled: true,
    displayRequestDuration: true,
    onComplete: function () {
      if (token) {
        ui.preauthorizeApiKey("bearer", token);
      }
    },
  });
  window.ui = ui;
})();
