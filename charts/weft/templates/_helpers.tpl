{{/* Labels of one component (the same as `weft install` renders). */}}
{{- define "weft.labels" -}}
app.kubernetes.io/name: {{ . }}
app.kubernetes.io/part-of: weft
{{- end }}

{{- define "weft.image" -}}
{{ .root.Values.image.registry | trimSuffix "/" }}/{{ .name }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end }}

{{- define "weft.trustAnchorsPEM" -}}
{{ required "identity.trustAnchorsPEM is required: generate an identity with `weft identity --out <dir>` and pass --set-file identity.trustAnchorsPEM=<dir>/trust-anchors.pem (and identity.issuer.certPEM, identity.issuer.keyPEM)" .Values.identity.trustAnchorsPEM }}
{{- end }}

{{- define "weft.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "weft.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end }}

{{- define "weft.resources" -}}
requests:
  cpu: 50m
  memory: 64Mi
limits:
  memory: 256Mi
{{- end }}

{{/* Relabelings giving proxies' series the namespace, pod and workload labels the
     dashboards group by (`weft install` renders the same rules). */}}
{{- define "weft.relabelings" -}}
{{- $s := .source }}{{- $t := .target -}}
- {{ $s }}: [__meta_kubernetes_namespace]
  regex: (.+)
  {{ $t }}: namespace
  replacement: $1
  action: replace
- {{ $s }}: [__meta_kubernetes_pod_name]
  regex: (.+)
  {{ $t }}: pod
  replacement: $1
  action: replace
- {{ $s }}: [__meta_kubernetes_pod_controller_name]
  regex: (.+)
  {{ $t }}: workload
  replacement: $1
  action: replace
- {{ $s }}: [__meta_kubernetes_pod_controller_kind, __meta_kubernetes_pod_controller_name]
  regex: ReplicaSet;(.+)-[a-z0-9]+
  {{ $t }}: workload
  replacement: $1
  action: replace
- {{ $s }}: [__meta_kubernetes_pod_label_app]
  regex: (.+)
  {{ $t }}: workload
  replacement: $1
  action: replace
- {{ $s }}: [__meta_kubernetes_pod_label_app_kubernetes_io_name]
  regex: (.+)
  {{ $t }}: workload
  replacement: $1
  action: replace
{{- end }}
