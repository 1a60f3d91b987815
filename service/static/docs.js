// /docs: Swagger UI for the worker's /openapi.json. URLs are built from location.origin: a page
// opened as http://user:pass@host/ would otherwise hand fetch() a URL with credentials, which it refuses.
"use strict";
const base = location.origin + location.pathname.replace(/docs\/?$/, "");
document.getElementById("spec").href = `${base}openapi.json`;
window.ui = SwaggerUIBundle({
  url: `${base}openapi.json`,
  dom_id: "#swagger-ui",
  deepLinking: true,
  tryItOutEnabled: false,
  validatorUrl: null,  // the default badge asks validator.swagger.io: nothing leaves the server
  presets: [SwaggerUIBundle.presets.apis],
  plugins: [SwaggerUIBundle.plugins.DownloadUrl],
  layout: "BaseLayout",
});
