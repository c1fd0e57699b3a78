# Stand-in for the official nats:<version>-alpine image, for machines that
# reach no image registry (scripts/docker-test.sh builds it): the official
# static nats-server and BusyBox for a shell and `wget` (compose.yml's
# healthcheck). Its arguments (compose.yml passes flags only) go to
# nats-server, as in the official image.
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY nats-server /usr/local/bin/nats-server
ENV PATH=/usr/local/bin:/bin
EXPOSE 4222 6222 8222
ENTRYPOINT ["nats-server"]
CMD ["--jetstream", "--store_dir", "/data"]
