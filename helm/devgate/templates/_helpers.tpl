{{/* Names. */}}
{{- define "devgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "devgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "devgate.gateway.fullname" -}}{{ include "devgate.fullname" . }}-gateway{{- end -}}
{{- define "devgate.bridgeApi.fullname" -}}{{ include "devgate.fullname" . }}-bridge-api{{- end -}}
{{- define "devgate.nginx.fullname" -}}{{ include "devgate.fullname" . }}-nginx{{- end -}}
{{- define "devgate.lbSync.fullname" -}}{{ include "devgate.fullname" . }}-lb-sync{{- end -}}
{{- define "devgate.nats.fullname" -}}{{ include "devgate.fullname" . }}-nats{{- end -}}
{{- define "devgate.secretName" -}}
{{- default (include "devgate.fullname" .) .Values.secrets.existingSecret -}}
{{- end -}}

{{/* Labels: common ones, and the selector of one component (pass (list $ "component")). */}}
{{- define "devgate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "devgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "devgate.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "devgate.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "devgate.componentLabels" -}}
{{ include "devgate.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/*
The Prometheus `job` of a component's targets: <fullname>-<component>, set by the monitors
(servicemonitor.yaml) so the alerts and the dashboard need not know prometheus-operator's
naming, and two releases in one namespace stay apart. Args: (list $ component).
*/}}
{{- define "devgate.monitorJob" -}}
- action: replace
  targetLabel: job
  replacement: {{ include "devgate.fullname" (index . 0) }}-{{ index . 1 }}
{{- end -}}

{{/* Images. */}}
{{- define "devgate.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "devgate.nginx.image" -}}
{{- if .Values.nginx.image.repository -}}
{{- printf "%s:%s" .Values.nginx.image.repository (default "stable" .Values.nginx.image.tag) -}}
{{- else -}}
{{- include "devgate.image" . -}}
{{- end -}}
{{- end -}}

{{/* Prometheus scrape annotations for a pod serving /metrics on `port` (pass (list $ port)). */}}
{{- define "devgate.scrapeAnnotations" -}}
{{- $ := index . 0 -}}
{{- if $.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ index . 1 | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* NATS client URL every component uses. */}}
{{- define "devgate.nats.url" -}}
{{- if .Values.nats.enabled -}}
{{- printf "%s://%s.%s.svc:4222" (ternary "tls" "nats" (not (empty .Values.nats.tls.existingSecret))) (include "devgate.nats.fullname" .) .Release.Namespace -}}
{{- else -}}
{{- required "nats.url is required when nats.enabled=false (the existing NATS to use)" .Values.nats.url -}}
{{- end -}}
{{- end -}}

{{/* Whether components connect to NATS with a user and password. */}}
{{- define "devgate.nats.auth" -}}
{{- if or .Values.nats.enabled .Values.nats.external.auth -}}true{{- end -}}
{{- end -}}

{{/*
NATS connection env of a component: (list $ "gateway"|"bridgeApi").
The in-cluster NATS has fixed user names (nats/accounts.conf); an existing NATS uses
nats.external.users.
*/}}
{{- define "devgate.nats.env" -}}
{{- $ := index . 0 -}}
{{- $role := index . 1 -}}
- name: DEVGATE_NATS_URL
  value: {{ include "devgate.nats.url" $ | quote }}
{{- if include "devgate.nats.auth" $ }}
- name: DEVGATE_NATS_USER
  value: {{ ternary (include "devgate.nats.user" (list $ $role)) (get $.Values.nats.external.users $role) $.Values.nats.enabled | quote }}
- name: DEVGATE_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "devgate.secretName" $ }}
      key: {{ include "devgate.nats.passwordKey" (list $ $role) }}
{{- end }}
{{- if include "devgate.nats.clientTlsSecret" $ }}
- name: DEVGATE_NATS_TLS_CA
  value: /etc/devgate/nats-tls/ca.crt
{{- if and (not $.Values.nats.enabled) $.Values.nats.external.tls.clientCertificate }}
- name: DEVGATE_NATS_TLS_CERT
  value: /etc/devgate/nats-tls/tls.crt
- name: DEVGATE_NATS_TLS_KEY
  value: /etc/devgate/nats-tls/tls.key
{{- end }}
{{- end }}
{{- end -}}

{{/*
Which of its role's two NATS users a component connects as (nats.userSlot.<role>): the role's
own (gateway, bridge-api) or its twin (gateway-alt, bridge-api-alt), each with its own password,
so that a password changes without cutting anyone off (docs/deploy.md#rotating-nats-passwords).
An existing NATS has the users it has (nats.external.users). Args: (list $ role).
*/}}
{{- define "devgate.nats.alt" -}}
{{- $ := index . 0 -}}
{{- $role := index . 1 -}}
{{- $slot := get $.Values.nats.userSlot $role -}}
{{- if not (has $slot (list "primary" "alt")) -}}
{{- fail (printf "nats.userSlot.%s must be primary or alt, got %v" $role $slot) -}}
{{- end -}}
{{- if and (eq $slot "alt") (not $.Values.nats.enabled) -}}
{{- fail (printf "nats.userSlot.%s=alt is for the chart's own NATS; for an existing NATS set nats.external.users.%s and the Secret's password instead" $role $role) -}}
{{- end -}}
{{- if eq $slot "alt" }}alt{{ end -}}
{{- end -}}

{{- define "devgate.nats.user" -}}
{{- $base := get (dict "gateway" "gateway" "bridgeApi" "bridge-api") (index . 1) -}}
{{- $base }}{{ if include "devgate.nats.alt" . }}-alt{{ end -}}
{{- end -}}

{{- define "devgate.nats.passwordKey" -}}
{{- $base := get (dict "gateway" "gateway" "bridgeApi" "bridge-api") (index . 1) -}}
nats-{{ $base }}{{ if include "devgate.nats.alt" . }}-alt{{ end }}-password
{{- end -}}

{{/* The Secret a NATS client mounts for TLS: nats.tls (in-cluster) or nats.external.tls
(existing NATS); empty without TLS. */}}
{{- define "devgate.nats.clientTlsSecret" -}}
{{- if .Values.nats.enabled -}}{{ .Values.nats.tls.existingSecret }}{{- else -}}{{ .Values.nats.external.tls.existingSecret }}{{- end -}}
{{- end -}}

{{/* The NATS TLS Secret's mount in a NATS client's container. */}}
{{- define "devgate.nats.tlsMount" -}}
- name: nats-tls
  mountPath: /etc/devgate/nats-tls
  readOnly: true
{{- end -}}

{{/* The NATS TLS Secret as a pod volume. For the in-cluster NATS only its ca.crt: the same
Secret holds the server's private key. */}}
{{- define "devgate.nats.tlsVolume" -}}
- name: nats-tls
  secret:
    secretName: {{ include "devgate.nats.clientTlsSecret" . }}
    defaultMode: 0440
    {{- if .Values.nats.enabled }}
    items:
      - key: ca.crt
        path: ca.crt
    {{- end }}
{{- end -}}

{{/* The ConfigMap holding the gateway's device denylist (key denied-devices): the existing one
named by gateway.deniedDevicesConfigMap, else the chart's own, which exists even when
gateway.deniedDevices is empty, so the first revocation (or the last one lifted) is a file
update the gateways re-read, not a pod template change that restarts them all. */}}
{{- define "devgate.gateway.deniedDevicesConfigMap" -}}
{{- if .Values.gateway.deniedDevicesConfigMap -}}
{{ .Values.gateway.deniedDevicesConfigMap }}
{{- else -}}
{{ include "devgate.fullname" . }}-denied-devices
{{- end -}}
{{- end -}}

{{/* The gateway's terminationGracePeriodSeconds: preStop sleep + drain window + 5 s gateway
grace + 5 s margin. */}}
{{- define "devgate.gateway.terminationGrace" -}}
{{- $drainS := div (add .Values.gateway.drainWindowMs 999) 1000 -}}
{{- add .Values.gateway.preStopSleepSeconds $drainS 5 5 -}}
{{- end -}}

{{/*
An existing Secret of the release's namespace, by name: a dict, empty when there is none (and
always under `helm template`, which has no cluster). Every lookup of the chart goes through
here, so the chart test can stand a file in for the cluster. Call with (list $ name).
*/}}
{{- define "devgate.existingSecret" -}}
{{- $root := index . 0 -}}
{{- lookup "v1" "Secret" $root.Release.Namespace (index . 1) | toYaml -}}
{{- end -}}

{{/* The Secret holding the devices' server certificate (tls.crt, tls.key): the one named by
nginx.tls.existingSecret (modes secret and passthrough), else the chart's generated one. */}}
{{- define "devgate.deviceTls.secret" -}}
{{- if .Values.nginx.tls.existingSecret -}}
{{ .Values.nginx.tls.existingSecret }}
{{- else -}}
{{ include "devgate.fullname" . }}-device-tls
{{- end -}}
{{- end -}}

{{/* "true" when nginx terminates the devices' TLS (nginx.tls.mode generate or secret). */}}
{{- define "devgate.deviceTls.atNginx" -}}
{{- if has .Values.nginx.tls.mode (list "generate" "secret") }}true{{ end -}}
{{- end -}}

{{/* "true" when the gateways terminate the devices' TLS (nginx.tls.mode=passthrough): nginx,
or the ingress controller, forwards the TLS bytes untouched. */}}
{{- define "devgate.deviceTls.atGateways" -}}
{{- if eq .Values.nginx.tls.mode "passthrough" }}true{{ end -}}
{{- end -}}

{{/* "true" when the chart generates the device server certificate (Secret
<fullname>-device-tls): mode generate with the chart's nginx, or passthrough without
nginx.tls.existingSecret. */}}
{{- define "devgate.deviceTls.generated" -}}
{{- if or (and (eq .Values.nginx.tls.mode "generate") (eq .Values.loadBalancer.mode "nginx")) (and (include "devgate.deviceTls.atGateways" .) (not .Values.nginx.tls.existingSecret)) }}true{{ end -}}
{{- end -}}

{{/* "true" when the device's TLS client certificate alone authenticates it
(gateway.deviceAuth=certificate): the gateways then take no fleet secret. A value missing after
--reuse-values from an older chart is token, the only way there was. */}}
{{- define "devgate.gateway.certificateAuth" -}}
{{- if eq (toString (default "token" .Values.gateway.deviceAuth)) "certificate" }}true{{ end -}}
{{- end -}}

{{/* Where the gateway container finds the device TLS files (nginx.tls.mode=passthrough):
directory mounts (never subPath, which the kubelet does not update on renewal). */}}
{{- define "devgate.gateway.deviceTlsDir" -}}/etc/devgate/device-tls{{- end -}}
{{- define "devgate.gateway.deviceClientCaDir" -}}/etc/devgate/device-client-ca{{- end -}}

{{/* Volume mounts of the device TLS files, shared by nginx and lb-sync (nginx mode). */}}
{{- define "devgate.deviceTls.mounts" -}}
{{- if include "devgate.deviceTls.atNginx" . }}
- name: device-tls
  mountPath: /etc/devgate-device-tls
  readOnly: true
{{- if .Values.nginx.tls.clientCaSecret }}
- name: device-client-ca
  mountPath: /etc/devgate-device-ca
  readOnly: true
{{- end }}
{{- end }}
{{- end -}}

{{/* Checks across values that a schema cannot express. */}}
{{- define "devgate.validate" -}}
{{- if not (has .Values.loadBalancer.mode (list "nginx" "ingressController")) -}}
{{- fail (printf "loadBalancer.mode %q: choose nginx or ingressController" .Values.loadBalancer.mode) -}}
{{- end -}}
{{- if and (eq .Values.loadBalancer.mode "ingressController") (not .Values.ingressController.configMapName) -}}
{{- fail "loadBalancer.mode=ingressController needs ingressController.configMapName (the NGINX Inc. ingress controller's ConfigMap, in the release namespace)" -}}
{{- end -}}
{{- if not (kindIs "map" .Values.nginx.tls) -}}
{{- fail "nginx.tls is missing: this chart version added device TLS. Upgrade with --reset-then-reuse-values (not --reuse-values), and see docs/deploy.md, section Upgrading to device TLS" -}}
{{- end -}}
{{- if not (has .Values.nginx.tls.mode (list "generate" "secret" "passthrough" "plaintext")) -}}
{{- fail (printf "nginx.tls.mode %q: choose generate, secret, passthrough or plaintext" .Values.nginx.tls.mode) -}}
{{- end -}}
{{- if and (eq .Values.nginx.tls.mode "secret") (not .Values.nginx.tls.existingSecret) -}}
{{- fail "nginx.tls.mode=secret needs nginx.tls.existingSecret (a Secret with tls.crt and tls.key, e.g. from cert-manager)" -}}
{{- end -}}
{{- if and (eq .Values.loadBalancer.mode "ingressController") (include "devgate.deviceTls.atNginx" .) -}}
{{- fail "loadBalancer.mode=ingressController: lb-sync renders the controller's device listener without TLS of its own; set nginx.tls.mode=passthrough for TLS at the gateways (the controller forwards it), or set nginx.tls.mode=plaintext to acknowledge plaintext (or TLS on a load balancer in front of the controller)" -}}
{{- end -}}
{{- if and .Values.nginx.tls.existingSecret (not (has .Values.nginx.tls.mode (list "secret" "passthrough"))) -}}
{{- fail "nginx.tls.existingSecret is used with nginx.tls.mode=secret or passthrough only" -}}
{{- end -}}
{{- if not (has .Values.nginx.tls.keyAlgorithm (list "ecdsa" "rsa")) -}}
{{- fail (printf "nginx.tls.keyAlgorithm %q: choose ecdsa or rsa" .Values.nginx.tls.keyAlgorithm) -}}
{{- end -}}
{{- if ne (not .Values.nginx.tls.ca.cert) (not .Values.nginx.tls.ca.key) -}}
{{- fail "nginx.tls.ca.cert and nginx.tls.ca.key go together" -}}
{{- end -}}
{{- if and .Values.nginx.tls.ca.cert (not (include "devgate.deviceTls.generated" .)) -}}
{{- fail "nginx.tls.ca signs the generated certificate: it is used with nginx.tls.mode=generate only, or passthrough without nginx.tls.existingSecret" -}}
{{- end -}}
{{- if and (eq .Values.nginx.tls.mode "plaintext") .Values.nginx.tls.clientCaSecret -}}
{{- fail "nginx.tls.clientCaSecret (device certificates) needs TLS: nginx.tls.mode generate, secret or passthrough" -}}
{{- end -}}
{{- if include "devgate.deviceTls.atGateways" . -}}
{{- if and (eq .Values.loadBalancer.mode "ingressController") (not .Values.nginx.tls.existingSecret) (not .Values.nginx.tls.dnsNames) (not .Values.nginx.tls.ipAddresses) -}}
{{- fail "nginx.tls.mode=passthrough with loadBalancer.mode=ingressController: devices dial the controller, whose name the generated certificate cannot know; set nginx.tls.dnsNames or nginx.tls.ipAddresses to what devices dial, or nginx.tls.existingSecret" -}}
{{- end -}}
{{- $protocols := sortAlpha (default (list) .Values.nginx.tls.protocols) -}}
{{- if ne (toJson $protocols) (toJson (list "TLSv1.2" "TLSv1.3")) -}}
{{- fail (printf "nginx.tls.protocols %v are nginx's: with nginx.tls.mode=passthrough the gateways terminate TLS and offer TLSv1.2 and TLSv1.3; keep the default [TLSv1.2, TLSv1.3], or let nginx terminate TLS (mode generate or secret)" .Values.nginx.tls.protocols) -}}
{{- end -}}
{{- if ne (int .Values.nginx.tls.verifyDepth) 3 -}}
{{- fail (printf "nginx.tls.verifyDepth %v is nginx's: with nginx.tls.mode=passthrough the gateways check device certificates (any chain up to nginx.tls.clientCaSecret); keep the default 3" .Values.nginx.tls.verifyDepth) -}}
{{- end -}}
{{- end -}}
{{- if not (has (toString (default "token" .Values.gateway.deviceAuth)) (list "token" "certificate")) -}}
{{- fail (printf "gateway.deviceAuth %q: choose token (the fleet secret's HELLO tokens) or certificate (the device's TLS client certificate alone)" (toString .Values.gateway.deviceAuth)) -}}
{{- end -}}
{{- if include "devgate.gateway.certificateAuth" . -}}
{{- if not (include "devgate.deviceTls.atGateways" .) -}}
{{- fail (printf "gateway.deviceAuth=certificate: the gateways check the device certificates themselves, so device TLS must end at them; set nginx.tls.mode=passthrough (not %s) and nginx.tls.clientCaSecret" .Values.nginx.tls.mode) -}}
{{- end -}}
{{- if not .Values.nginx.tls.clientCaSecret -}}
{{- fail "gateway.deviceAuth=certificate needs nginx.tls.clientCaSecret: a Secret whose ca.crt issues the device certificates (each naming its device id), which is all that authenticates a device" -}}
{{- end -}}
{{- if .Values.secrets.deviceAuthSecretPrevious -}}
{{- fail "secrets.deviceAuthSecretPrevious is not used with gateway.deviceAuth=certificate: the gateways take no fleet secret (HELLO tokens are ignored); unset it" -}}
{{- end -}}
{{- end -}}
{{- if ne .Values.nginx.tls.mode "plaintext" -}}
{{- $_ := include "devgate.count" (list "nginx.tls.checkIntervalS" .Values.nginx.tls.checkIntervalS) -}}
{{- if lt (int64 .Values.nginx.tls.checkIntervalS) 1 -}}
{{- fail "nginx.tls.checkIntervalS must be at least 1 (seconds between checks of the TLS files for a renewal)" -}}
{{- end -}}
{{- if and (include "devgate.deviceTls.atGateways" .) (gt (int64 .Values.nginx.tls.checkIntervalS) 86400) -}}
{{- fail (printf "nginx.tls.checkIntervalS %v: with nginx.tls.mode=passthrough the gateways re-read the TLS files at most a day apart (86400)" .Values.nginx.tls.checkIntervalS) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.nats.enabled (eq (mod (int .Values.nats.replicas) 2) 0) -}}
{{- fail (printf "nats.replicas %v: use an odd number (1, 3, 5) so JetStream keeps a quorum" .Values.nats.replicas) -}}
{{- end -}}
{{- if and .Values.nats.enabled .Values.nats.external.tls.existingSecret -}}
{{- fail "nats.external.tls is for an existing NATS (nats.enabled=false); for the in-cluster NATS set nats.tls.existingSecret" -}}
{{- end -}}
{{- if and (not .Values.nats.enabled) .Values.nats.tls.existingSecret -}}
{{- fail "nats.tls is for the in-cluster NATS (nats.enabled=true); for an existing NATS use a tls:// nats.url and nats.external.tls" -}}
{{- end -}}
{{- if and .Values.nats.enabled .Values.nats.url -}}
{{- fail "nats.url is only for an existing NATS: set nats.enabled=false to use it, or leave it empty" -}}
{{- end -}}
{{- if and .Values.secrets.deviceAuthSecret (lt (len .Values.secrets.deviceAuthSecret) 16) -}}
{{- fail "secrets.deviceAuthSecret must be at least 16 characters (the gateway refuses shorter ones)" -}}
{{- end -}}
{{- range $list := list "apiTokens" "apiReadTokens" -}}
{{- range (get $.Values.secrets $list) -}}
{{- if not (kindIs "string" .) -}}
{{- fail (printf "secrets.%s entries must be strings: quote tokens that YAML reads as numbers or booleans" $list) -}}
{{- end -}}
{{- if lt (len .) 16 -}}
{{- fail (printf "every secrets.%s entry must be at least 16 characters (bridge-api refuses shorter ones)" $list) -}}
{{- end -}}
{{- if contains "," . -}}
{{- fail (printf "secrets.%s entries must not contain commas (they are joined with commas)" $list) -}}
{{- end -}}
{{- if ne (trim .) . -}}
{{- fail (printf "secrets.%s entries must not begin or end with whitespace (a space, tab or stray newline): no caller could present such a token, so bridge-api refuses it" $list) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with .Values.secrets.apiReadTokens -}}
{{- if $.Values.secrets.existingSecret -}}
{{- fail "secrets.apiReadTokens is not used with secrets.existingSecret: put the read-only tokens in that Secret, key api-read-tokens (comma-separated)" -}}
{{- end -}}
{{- range . -}}
{{- if has . $.Values.secrets.apiTokens -}}
{{- fail "a token is in both secrets.apiTokens and secrets.apiReadTokens (bridge-api refuses it): give the reader its own token" -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- with .Values.secrets.deviceAuthSecretPrevious -}}
{{- if not (kindIs "string" .) -}}
{{- fail "secrets.deviceAuthSecretPrevious must be a string: quote a secret that YAML reads as a number or a boolean" -}}
{{- end -}}
{{- $previous := toString . -}}
{{- if $.Values.secrets.existingSecret -}}
{{- fail "secrets.deviceAuthSecretPrevious is not used with secrets.existingSecret: put the previous fleet secret in that Secret, key device-auth-secret-previous" -}}
{{- end -}}
{{- if lt (len $previous) 16 -}}
{{- fail "secrets.deviceAuthSecretPrevious must be at least 16 characters (the gateway refuses shorter ones)" -}}
{{- end -}}
{{- if ne (trim $previous) $previous -}}
{{- fail "secrets.deviceAuthSecretPrevious must not begin or end with whitespace (a space, tab or stray newline): no device token was made with such a secret" -}}
{{- end -}}
{{- /* The current secret: given, or the one the Secret in the cluster keeps (an upgrade that
     sets only the previous one would otherwise "rotate" to the same secret). */ -}}
{{- $current := toString (default "" $.Values.secrets.deviceAuthSecret) -}}
{{- if not $current -}}
{{- with include "devgate.existingSecret" (list $ (include "devgate.fullname" $)) | fromYaml -}}
{{- $current = get (default dict .data) "device-auth-secret" | b64dec -}}
{{- end -}}
{{- end -}}
{{- if eq $previous $current -}}
{{- fail "secrets.deviceAuthSecretPrevious equals the current fleet secret (secrets.deviceAuthSecret, or the one kept in the Secret): a rotation sets the old secret as deviceAuthSecretPrevious and a new one as deviceAuthSecret" -}}
{{- end -}}
{{- end -}}
{{- if and .Values.gateway.deniedDevices .Values.gateway.deniedDevicesConfigMap -}}
{{- fail "gateway.deniedDevices and gateway.deniedDevicesConfigMap are both set: the gateways read only the ConfigMap, so the listed ids would stay admitted. Put them in that ConfigMap, or unset deniedDevicesConfigMap" -}}
{{- end -}}
{{- range .Values.gateway.deniedDevices -}}
{{- if not (kindIs "string" .) -}}
{{- fail (printf "gateway.deniedDevices entry %v is not a string: quote ids that YAML reads as numbers or booleans (\"0123\"), or the gateway would deny another id" .) -}}
{{- end -}}
{{- if not (regexMatch "^[A-Za-z0-9_-]{1,128}$" .) -}}
{{- fail (printf "gateway.deniedDevices entry %q is not a device id: device ids are 1 to 128 characters of A-Z a-z 0-9 _ - (no whitespace)" .) -}}
{{- end -}}
{{- end -}}
{{- /* The chart sets these itself; a second entry of the same name in extraEnv would be
     ambiguous (and Kubernetes keeps one of them). */ -}}
{{- $chartEnv := dict
  "gateway" (list "DEVGATE_DEVICE_AUTH" "DEVGATE_AUTH_SECRET" "DEVGATE_AUTH_SECRET_PREVIOUS" "DEVGATE_PROXY_PROTOCOL" "DEVGATE_PROXY_TRUSTED_CIDRS" "DEVGATE_DRAIN_WINDOW_MS" "DEVGATE_DRAIN_RECONNECT_JITTER_MS" "DEVGATE_MAX_CONNECTIONS" "DEVGATE_MAX_FRAME_LEN" "DEVGATE_HEARTBEAT_S" "DEVGATE_MAX_HANDSHAKES" "DEVGATE_MAX_HELLO_LEN" "DEVGATE_HELLO_TIMEOUT_MS" "DEVGATE_SESSION_QUEUE_BYTES" "DEVGATE_MAX_INFLIGHT" "DEVGATE_ACK_TIMEOUT_MS" "DEVGATE_WRITE_TIMEOUT_MS" "DEVGATE_MAX_LOGINS_PER_ID" "DEVGATE_LOGIN_WINDOW_S" "DEVGATE_UP_RATE_MSGS" "DEVGATE_UP_RATE_BYTES" "DEVGATE_UP_BURST_MS" "DEVGATE_DENIED_DEVICES_FILE" "DEVGATE_LOG_FORMAT")
  "bridgeApi" (list "DEVGATE_API_TOKEN" "DEVGATE_API_READ_TOKEN" "DEVGATE_MAX_FRAME_LEN" "DEVGATE_MAX_TAILS" "DEVGATE_MAX_WILDCARD_TAILS" "DEVGATE_TAIL_BUFFER_BYTES" "DEVGATE_DEFAULT_TIMEOUT_MS" "DEVGATE_REQUEST_TIMEOUT_MS" "DEVGATE_BULK_MAX_DEVICES" "DEVGATE_BULK_CONCURRENCY" "DEVGATE_LOG_FORMAT") -}}
{{- /* TLS at the gateways is a mode of its own: through extraEnv, nginx would still terminate
     TLS (or speak plaintext) in front of gateways that expect a TLS handshake. */ -}}
{{- range .Values.gateway.extraEnv -}}
{{- if hasPrefix "DEVGATE_DEVICE_TLS_" (toString .name) -}}
{{- fail (printf "gateway.extraEnv sets %s: TLS at the gateways is nginx.tls.mode=passthrough, which sets it (certificate from nginx.tls.existingSecret or generated, client CA from nginx.tls.clientCaSecret, checks every nginx.tls.checkIntervalS)" .name) -}}
{{- end -}}
{{- end -}}
{{- range $component, $names := $chartEnv -}}
{{- range (get $.Values $component).extraEnv -}}
{{- if has .name $names -}}
{{- fail (printf "%s.extraEnv sets %s, which the chart sets from its own value: use that value instead (see values.yaml)" $component .name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and .Values.secrets.nats.routePassword (not (regexMatch "^[A-Za-z0-9_-]+$" (toString .Values.secrets.nats.routePassword))) -}}
{{- fail "secrets.nats.routePassword must be URL-safe (A-Z a-z 0-9 _ -): it is part of the route URLs" -}}
{{- end -}}
{{- /* The in-cluster nats-server reads each password as a configuration value ($VAR), not as
     a plain string: digits (123), sizes (10k), booleans (yes, off), dates (1-2), whitespace
     and most punctuation either stop it from starting or make the user's logins fail. */ -}}
{{- if .Values.nats.enabled -}}
{{- range $key, $value := .Values.secrets.nats -}}
{{- $pw := toString $value -}}
{{- if and $value (or (not (regexMatch "^[A-Za-z_][A-Za-z0-9_-]*$" $pw)) (has (lower $pw) (list "true" "false" "yes" "no" "on" "off"))) -}}
{{- fail (printf "secrets.nats.%s must start with a letter or _ and hold only A-Z a-z 0-9 _ - (and not be true/false/yes/no/on/off): the in-cluster nats-server reads it as a configuration value, and other values stop it or refuse the user's logins" $key) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.loadBalancer.mode "nginx") (has (int .Values.nginx.healthPort) (list (int .Values.nginx.port) (int .Values.lbSync.httpPort))) -}}
{{- fail (printf "nginx.healthPort %v must differ from nginx.port and lbSync.httpPort (the nginx pod's containers share one network)" .Values.nginx.healthPort) -}}
{{- end -}}
{{- if not (kindIs "map" .Values.gateway.uplinkRate) -}}
{{- fail "gateway.uplinkRate is missing: this chart version added the gateway's and bridge-api's limits as values (gateway.maxHandshakes, bridgeApi.maxTails, ...). Upgrade with --reset-then-reuse-values (not --reuse-values)" -}}
{{- end -}}
{{- if not (kindIs "map" .Values.nats.userSlot) -}}
{{- fail "nats.userSlot is missing: this chart version added twin NATS users for password changes without an interruption (docs/deploy.md#rotating-nats-passwords). Upgrade with --reset-then-reuse-values (not --reuse-values)" -}}
{{- end -}}
{{- if not (kindIs "map" .Values.networkPolicy) -}}
{{- fail "networkPolicy is missing: this chart version added NetworkPolicies (docs/deploy.md, section Network policies). Upgrade with --reset-then-reuse-values (not --reuse-values)" -}}
{{- end -}}
{{- if and .Values.networkPolicy.enabled (eq .Values.loadBalancer.mode "nginx") .Values.nginx.hostNetwork (not .Values.networkPolicy.gateway.deviceFrom) -}}
{{- fail "nginx.hostNetwork=true with networkPolicy.enabled: nginx connects to the gateways from its node's address, which no pod selector matches; set networkPolicy.gateway.deviceFrom to the nodes' addresses (e.g. - ipBlock: {cidr: 10.0.0.0/16}, see docs/deploy.md#network-policies), or networkPolicy.enabled=false" -}}
{{- end -}}
{{- $idle := mul .Values.gateway.heartbeatS 3 -}}
{{- if le (int .Values.lbSync.proxyTimeoutS) (int $idle) -}}
{{- fail (printf "lbSync.proxyTimeoutS %v must exceed the gateway idle limit 3 x gateway.heartbeatS = %v s, or nginx cuts quiet devices" .Values.lbSync.proxyTimeoutS $idle) -}}
{{- end -}}
{{- end -}}

{{/*
checksum/secrets of one workload: a hash of the Secret keys it reads, as given in values
(list . "key" ...). Pods take Secret values only when they start, so without it a `helm upgrade`
that changes a token or password would change nothing until some later restart; with it the
upgrade rolls exactly the pods that read the changed key. Generated values are not in it: they
are kept across upgrades and never change. Empty with secrets.existingSecret, whose content
the chart does not know (restart the pods after changing that Secret).
*/}}
{{- define "devgate.secretsChecksum" -}}
{{- $ := index . 0 -}}
{{- if not $.Values.secrets.existingSecret -}}
{{- $s := $.Values.secrets -}}
{{- $given := dict
  "device-auth-secret" (toString (default "" $s.deviceAuthSecret))
  "device-auth-secret-previous" (toString (default "" $s.deviceAuthSecretPrevious))
  "api-tokens" (join "," (default (list) $s.apiTokens))
  "api-read-tokens" (join "," (default (list) $s.apiReadTokens))
  "nats-gateway-password" (toString (default "" $s.nats.gatewayPassword))
  "nats-bridge-api-password" (toString (default "" $s.nats.bridgeApiPassword))
  "nats-lb-sync-password" (toString (default "" $s.nats.lbSyncPassword))
  "nats-service-password" (toString (default "" $s.nats.servicePassword))
  "nats-sys-password" (toString (default "" $s.nats.sysPassword))
  "nats-route-password" (toString (default "" $s.nats.routePassword))
  "nats-gateway-alt-password" (toString (default "" $s.nats.gatewayAltPassword))
  "nats-bridge-api-alt-password" (toString (default "" $s.nats.bridgeApiAltPassword))
  "nats-lb-sync-alt-password" (toString (default "" $s.nats.lbSyncAltPassword))
  "nats-service-alt-password" (toString (default "" $s.nats.serviceAltPassword)) -}}
{{- $parts := list -}}
{{- range $key := rest . -}}
{{- if not (hasKey $given $key) -}}
{{- fail (printf "devgate.secretsChecksum: unknown key %s" $key) -}}
{{- end -}}
{{- $parts = append $parts (printf "%s=%s" $key (get $given $key)) -}}
{{- end -}}
{{- join "\n" $parts | sha256sum -}}
{{- end -}}
{{- end -}}

{{/*
A numeric setting rendered for an env var: (list "name.in.values" value). Helm hands large
numbers over as floats (1048576 would print as 1.048576e+06), and `int64` alone turns a typo
such as "10s", or a value missing after `--reuse-values`, into 0, which for some settings
(drainWindowMs) is valid and silently changes behaviour. So: a whole number >= 0, as digits,
or the render stops naming the value.
*/}}
{{- define "devgate.count" -}}
{{- $name := index . 0 -}}
{{- $v := index . 1 -}}
{{- if and (kindIs "string" $v) (regexMatch "^[0-9]+$" $v) -}}
{{- $v | quote -}}
{{- else if and (or (kindIs "float64" $v) (kindIs "int64" $v) (kindIs "int" $v)) (ge (float64 $v) 0.0) (eq (float64 $v) (float64 (int64 $v))) -}}
{{- int64 $v | toString | quote -}}
{{- else -}}
{{- fail (printf "%s must be a whole number of 0 or more, got %v (%s)" $name $v (kindOf $v)) -}}
{{- end -}}
{{- end -}}
