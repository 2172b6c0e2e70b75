"""The OHIF viewer's runtime configuration, served by Bastion at ``/app-config.js``.

The bundled viewer (npm ``@ohif/app`` 3.13.2, unpacked by ``scripts/fetch-ohif.sh`` into
``var/ohif``) reads ``window.config`` from ``/app-config.js`` before it starts. The file shipped in
the package points at a public demo server, so the server answers ``/app-config.js`` with the text
made here instead: one DICOMweb data source on this server (same origin, so no CORS), the study list
on ``/``, no investigational-use banner and no onboarding tour (the tour's modal overlay catches the
mouse wheel, so a first-time user cannot scroll a series until it is dismissed).

Keys are the ones of OHIF 3.13's ``dist/app-config.js`` (``investigationalUseDialog.option`` takes
``'never'``, ``'always'`` or ``'configure'``).

With ``[auth]`` enabled and ``auth_client_id`` set, the config also holds OHIF's ``oidc`` list: the viewer logs in
at the issuer (OpenID Connect authorization code flow, ``response_type: 'code'`` with PKCE, OpenID Connect Core
1.0 section 3.1) and sends the access token as ``Authorization: Bearer`` on every DICOMweb request.
"""

from __future__ import annotations

import json

__all__ = ["app_config_js", "oidc_js"]


def oidc_js(issuer: str, client_id: str, scope: str = "openid profile") -> str:
    """OHIF's ``oidc`` setting (a list of one client) for ``issuer`` and the public client ``client_id``."""
    client = {"authority": issuer, "client_id": client_id, "redirect_uri": "/callback", "response_type": "code",
              "scope": scope, "post_logout_redirect_uri": "/", "automaticSilentRenew": False,
              "revokeAccessTokenOnSignout": False}
    return f"  oidc: [{json.dumps(client)}],\n"


def app_config_js(dicomweb_root: str = "/dicom-web", wado_uri_root: str = "/wado", oidc: str = "") -> str:
    """Return the JavaScript text of OHIF's ``app-config.js`` for this server.

    ``dicomweb_root`` is the QIDO-RS / WADO-RS base (path or absolute URL, without a trailing
    slash), ``wado_uri_root`` the WADO-URI endpoint, ``oidc`` the login setting (:func:`oidc_js`) or ``""``.
    """
    root = dicomweb_root.rstrip("/") or "/"
    wado_uri = wado_uri_root.rstrip("/") or "/"
    # json.dumps gives valid, safely quoted JavaScript string literals.
    q_root = json.dumps(root)
    q_wado_uri = json.dumps(wado_uri)
    return f"""/** @type {{AppTypes.Config}} */
// Served by Bastion in place of the viewer's shipped app-config.js.
window.config = {{
  name: 'bastion',
  routerBasename: '/',
{oidc}  extensions: [],
  modes: [],
  // No onboarding tour: its modal overlay swallows wheel and mouse input on the first viewer visit.
  customizationService: {{
    'ohif.tours': {{ $set: [] }},
  }},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  experimentalStudyBrowserSort: false,
  strictZSpacingForVolumeViewport: true,
  groupEnabledModesFirst: true,
  allowMultiSelectExport: false,
  investigationalUseDialog: {{ option: 'never' }},
  // The header's logo is a link to Bastion's reading list (/reporting), out of the editor's frame too.
  whiteLabeling: {{
    createLogoComponentFn: function (React) {{
      return React.createElement('a', {{
        id: 'bastion-reporting-link', href: '/reporting', target: '_top', title: 'Reading list',
        style: {{ color: '#fff', fontWeight: 600, textDecoration: 'none', whiteSpace: 'nowrap' }},
      }}, 'Bastion \u00b7 Reading list');
    }},
  }},
  maxNumRequests: {{
    interaction: 100,
    thumbnail: 5,
    prefetch: 25,
  }},
  showErrorDetails: 'always',
  defaultDataSourceName: 'bastion',
  dataSources: [
    {{
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'bastion',
      configuration: {{
        friendlyName: 'Bastion PACS',
        name: 'bastion',
        wadoUriRoot: {q_wado_uri},
        qidoRoot: {q_root},
        wadoRoot: {q_root},
        qidoSupportsIncludeField: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        bulkDataURI: {{
          enabled: true,
          relativeResolution: 'studies',
        }},
        omitQuotationForMultipartRequest: true,
      }},
    }},
  ],
}};
"""
