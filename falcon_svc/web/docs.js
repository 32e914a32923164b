// Start Swagger UI on this service's own OpenAPI document.
//
// Our initializer, in place of the bundle's swagger-initializer.js (which points
// at the petstore): loaded as a file, so /docs runs under script-src 'self'.
"use strict";

window.addEventListener("DOMContentLoaded", function () {
  window.ui = window.SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    // BaseLayout: no top bar for loading other documents from other hosts.
    layout: "BaseLayout",
    // Never send the document to the public validator: no network beyond this service.
    validatorUrl: null,
    // Ignore ?url= and ?configUrl= in the address: this page documents this API only.
    queryConfigEnabled: false,
    displayRequestDuration: true,
    defaultModelsExpandDepth: 1,
    tryItOutEnabled: false,
  });
});
